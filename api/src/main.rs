//! The `kvtier` binary: all of it lives in the library; this only hands over.

fn main() -> std::process::ExitCode {
    kvtier::cli::main()
}
