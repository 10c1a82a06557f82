// A build script, so that Cargo builds the manifest's build-dependencies (for the host) too. It
// depends on nothing but itself: editing the generator or its test rebuilds neither binary.
fn main() {
    println!("cargo:rerun-if-changed=build.rs");
}
