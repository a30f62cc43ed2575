fn main() -> std::process::ExitCode {
    backfill::cli::main()
}
