# Quickstart: a template built from a start command with a readiness check, a warm pool that follows its
# `stable` tag and waits until it is filled, and a data source reading the pool's live status.
terraform {
  required_providers {
    warmpool = {
      source = "warmpool/warmpool"
    }
  }
}

variable "start_cmd" {
  type    = string
  default = "touch /tmp/started; exec sleep infinity"
}

variable "pool_enabled" {
  type    = bool
  default = true
}

provider "warmpool" {
  # endpoint = "http://127.0.0.1:7070"   # default: WARMPOOL_ENDPOINT, then this
  # token    = var.token                 # default: WARMPOOL_TOKEN
}

resource "warmpool_template" "api" {
  name        = "api"
  build_steps = ["echo built > built.txt"]
  build_env   = { GREETING = "hello" }
  start_cmd   = var.start_cmd
  readiness {
    exec {
      command = ["test", "-f", "/tmp/started"]
    }
    timeout_ms = 30000
  }
  warm_process {
    name    = "agent"
    type    = "cmd"
    command = ["/bin/sh", "-c", "exec sleep infinity"]
    readiness_probe {
      process {}
    }
  }
  resources {
    memory_mb = 256
  }
  env  = { MODE = "warm" }
  tags = ["stable"]
}

resource "warmpool_warm_pool" "api" {
  name           = "api"
  template       = "${warmpool_template.api.name}:stable"
  version_policy = "track_tag"
  track_tag      = "stable"
  min_ready      = 2
  max_ready      = 10
  enabled        = var.pool_enabled
  wait_for_ready = true
  depends_on     = [warmpool_template.api]
}

data "warmpool_warm_pool" "api" {
  id         = warmpool_warm_pool.api.id
  depends_on = [warmpool_warm_pool.api]
}

data "warmpool_template" "stable" {
  ref        = "${warmpool_template.api.name}:stable"
  depends_on = [warmpool_template.api]
}

output "stable_build" {
  value = data.warmpool_template.stable.build_id
}

output "ready" {
  value = data.warmpool_warm_pool.api.ready
}

output "build_id" {
  value = warmpool_template.api.build_id
}
