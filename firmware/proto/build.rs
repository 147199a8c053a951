//! Records the build time as `BORG_BUILD_UNIX_S` and the version as `BORG_VERSION`: the floor of network time (a node whose
//! clock reads earlier, like a Raspberry Pi 4 without RTC at 1970, starts from here).
//! `SOURCE_DATE_EPOCH` wins (reproducible builds); else the time of the build.
fn main() {
    println!("cargo:rerun-if-env-changed=SOURCE_DATE_EPOCH");
    println!("cargo:rerun-if-changed=build.rs");
    let secs = std::env::var("SOURCE_DATE_EPOCH")
        .ok()
        .and_then(|s| s.trim().parse::<u64>().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0)
        });
    println!("cargo:rustc-env=BORG_BUILD_UNIX_S={secs}");
    // The software version this binary reports and updates from: the crate version, or
    // BORG_RELEASE_VERSION for an image built as a release (image/build; docs/OTA.md).
    println!("cargo:rerun-if-env-changed=BORG_RELEASE_VERSION");
    let version = std::env::var("BORG_RELEASE_VERSION")
        .ok()
        .filter(|v| !v.trim().is_empty())
        .unwrap_or_else(|| std::env::var("CARGO_PKG_VERSION").unwrap_or_default());
    println!("cargo:rustc-env=BORG_VERSION={}", version.trim());
}
