use warmpool_action::runner::{ActionEnv, Runner};

const HELP: &str = "\
warmpool-action: the Warmpool GitHub Action's binary (the action's node shim runs it on the runner)

Usage: warmpool-action <COMMAND>

Commands:
  main       raise each pool with a lease, wait until `ready` sandboxes are ready, check out `checkout` of them
  post       delete what main checked out, release the lease, drain pools no other lease holds (on-finish)
  scale-up   put the lease and wait, without checking out (a burst that spans jobs)
  checkout   check sandboxes out of pools a scale-up raised
  drain      release the lease and drain the pools

Inputs come as the runner passes them, in INPUT_<NAME> variables (see action.yml): INPUT_ENDPOINT, INPUT_TOKEN,
INPUT_POOLS, INPUT_READY, INPUT_CHECKOUT, INPUT_WAIT-TIMEOUT, INPUT_TEMPLATE, INPUT_WARM-POOL-MODE,
INPUT_LEASE-TTL, INPUT_ON-FINISH, INPUT_GITHUB-TOKEN, INPUT_LEASE-KEY, INPUT_SANDBOXES. Outputs, state and the
step summary go to the files GITHUB_OUTPUT, GITHUB_STATE and GITHUB_STEP_SUMMARY name; without them they are
skipped. The lease key uses GITHUB_REPOSITORY, GITHUB_RUN_ID, GITHUB_RUN_ATTEMPT and GITHUB_JOB.

Run it locally against a server (`env` passes the names with a dash that a shell cannot export):
  export INPUT_ENDPOINT=http://127.0.0.1:7070 INPUT_TOKEN=$(cat .warmpool/admin.token) INPUT_POOLS=api
  export INPUT_READY=2 INPUT_CHECKOUT=1 GITHUB_OUTPUT=$PWD/out
  env INPUT_LEASE-KEY=local warmpool-action main && cat out   # the checked-out sandboxes: `sandbox-ids`
  env INPUT_LEASE-KEY=local warmpool-action drain             # releases the lease, drains the pools
";

fn main() {
    let arg = std::env::args().nth(1).unwrap_or_default();
    if matches!(arg.as_str(), "-h" | "--help" | "help") {
        print!("{HELP}");
        return;
    }
    let Ok(command) = arg.parse::<warmpool_action::Command>() else {
        eprint!("{HELP}");
        std::process::exit(2);
    };
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("tokio runtime");
    let mut runner = Runner::new(ActionEnv::from_process(), std::io::stdout());
    let code = runtime.block_on(warmpool_action::run(command, &mut runner));
    std::process::exit(code);
}
