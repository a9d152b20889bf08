//! The `rmount` binary: a thin shell over the library's CLI.
fn main() -> std::process::ExitCode {
    rmount::cli::main()
}
