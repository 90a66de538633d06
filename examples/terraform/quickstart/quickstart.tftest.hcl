# `terraform test` for the quickstart: applies it against the server in WARMPOOL_ENDPOINT and checks the pool filled
# and follows the template's build.
run "pool_fills_from_the_template_build" {
  command = apply

  assert {
    condition     = data.warmpool_warm_pool.api.ready >= 2
    error_message = "the warm pool did not reach min_ready"
  }

  assert {
    condition     = warmpool_warm_pool.api.resolved_build_id == warmpool_template.api.build_id
    error_message = "the pool does not fill the template's newest build"
  }

  assert {
    condition     = data.warmpool_template.stable.build_id == warmpool_template.api.build_id
    error_message = "the stable tag does not point at the template's newest build"
  }

  assert {
    condition     = warmpool_template.api.build_status == "ready"
    error_message = "the build is not ready"
  }
}
