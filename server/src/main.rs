use clap::Parser;

fn main() {
    let cli = warmpool_server::cli::Cli::parse();
    if !matches!(cli.command, warmpool_server::cli::Command::Serve(_)) {
        warmpool_server::cli::die_quietly_on_closed_stdout();
    }
    let default_level =
        if matches!(cli.command, warmpool_server::cli::Command::Serve(_)) { "info" } else { "warn" };
    tracing_subscriber::fmt()
        // Colours only on a terminal: a log file keeps plain text.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("WARMPOOL_LOG")
                .unwrap_or_else(|_| default_level.into()),
        )
        .init();
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("tokio runtime");
    let code = match runtime.block_on(warmpool_server::cli::run(cli)) {
        Ok(code) => code,
        Err(e) => {
            // One line: the server's code and message, or the local cause chain.
            let mut line = e.to_string();
            let mut source = e.source();
            while let Some(s) = source {
                line.push_str(": ");
                line.push_str(&s.to_string());
                source = s.source();
            }
            eprintln!("error: {line}");
            1
        }
    };
    std::process::exit(code);
}
