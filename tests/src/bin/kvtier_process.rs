//! The `kvtier` binary, built inside this package so the kill test (`tests/tests/kill.rs`) can
//! start it: cargo hands a test the path of its own package's binaries only. Same entry point as
//! `api/src/main.rs`, so this is the `kvtier` command line, `serve` included.

fn main() -> std::process::ExitCode {
    kvtier::cli::main()
}
