//! `tollgate`: argv → cli → exit code. Nothing else.

fn main() {
    std::process::exit(tollgate::cli::main());
}
