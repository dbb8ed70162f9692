// espeak-ng (the `espeak` feature) comes from the system (Debian `libespeak-ng-dev`); say where
// pkg-config finds it, if it does, so non-standard prefixes link too.
fn main() {
    if std::env::var_os("CARGO_FEATURE_ESPEAK").is_some() {
        if let Ok(output) =
            std::process::Command::new("pkg-config").args(["--libs-only-L", "espeak-ng"]).output()
        {
            for flag in String::from_utf8_lossy(&output.stdout).split_whitespace() {
                if let Some(dir) = flag.strip_prefix("-L") {
                    println!("cargo:rustc-link-search=native={dir}");
                }
            }
        }
    }
    println!("cargo:rerun-if-changed=build.rs");
}
