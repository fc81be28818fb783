fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protos = ["fl/v1/federation.proto"];
    for proto in protos {
        println!("cargo:rerun-if-changed={proto}");
    }
    // A vendored protoc, so that no system protoc is needed.
    std::env::set_var("PROTOC", protoc_bin_vendored::protoc_bin_path()?);
    tonic_prost_build::configure().compile_protos(&protos, &["."])?;
    Ok(())
}
