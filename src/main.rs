fn main() -> std::process::ExitCode {
    // Before any thread starts: it sets an environment variable candle reads on every matmul.
    hearth_backends::device::pin_cpu_threads();
    hearth::cli::main()
}
