//! Generates the gRPC code and the reflection descriptor set from proto/, and rebuilds when
//! the embedded PostgreSQL migrations change.
//! protoc comes from the `protoc-bin-vendored` crate, so a fresh machine needs only cargo.

use std::{env, error::Error, path::PathBuf};

fn main() -> Result<(), Box<dyn Error>> {
    let protoc = protoc_bin_vendored::protoc_bin_path()?;
    let well_known = protoc_bin_vendored::include_path()?;
    // SAFETY: build scripts are single-threaded; prost-build reads PROTOC from the environment.
    unsafe { env::set_var("PROTOC", protoc) };

    let out_dir = PathBuf::from(env::var("OUT_DIR")?);
    tonic_prost_build::configure()
        .file_descriptor_set_path(out_dir.join("tickd_descriptor.bin"))
        .bytes(".tickd.v1")
        .compile_protos(
            &[PathBuf::from("proto/tickd/v1/scheduler.proto")],
            &[PathBuf::from("proto"), well_known],
        )?;
    println!("cargo:rerun-if-changed=proto");
    // The PostgreSQL migrations are embedded by `sqlx::migrate!`.
    println!("cargo:rerun-if-changed=migrations");
    Ok(())
}
