use warmpool_action::runner::{ActionEnv, Runner};

fn main() {
    let Some(command) = std::env::args().nth(1).and_then(|c| c.parse::<warmpool_action::Command>().ok())
    else {
        eprintln!("usage: warmpool-action main|post|scale-up|checkout|drain");
        std::process::exit(2);
    };
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("tokio runtime");
    let mut runner = Runner::new(ActionEnv::from_process(), std::io::stdout());
    let code = runtime.block_on(warmpool_action::run(command, &mut runner));
    std::process::exit(code);
}
