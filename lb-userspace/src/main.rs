//! `lb`: the agent and its tools (see [`lb_userspace::cli`]).
#![forbid(unsafe_code)]

fn main() -> std::process::ExitCode {
    lb_userspace::cli::main()
}
