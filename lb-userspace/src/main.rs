//! `lb`: the agent and its tools (see [`lb_userspace::cli`]).

fn main() -> std::process::ExitCode {
    lb_userspace::cli::main()
}
