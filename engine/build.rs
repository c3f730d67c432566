include!("torch_link.rs");

/// Compiles the C shim that exports the MPI macros the `mpi` crate does not bind
/// (`MPI_IN_PLACE`), against the same MPI the `mpi` crate found.
fn build_mpi_shim() {
    println!("cargo:rerun-if-changed=src/comm/mpi_shim.c");
    let lib = match build_probe_mpi::probe() {
        Ok(lib) => lib,
        Err(errs) => {
            let why: Vec<String> = errs.iter().map(|e| e.to_string()).collect();
            panic!(
                "no MPI library found ({}); run scripts/setup.sh",
                why.join("; ")
            );
        }
    };
    let mut build = cc::Build::new();
    build.file("src/comm/mpi_shim.c");
    match lib.mpicc {
        Some(mpicc) => {
            build.compiler(mpicc);
        }
        None => {
            for inc in &lib.include_paths {
                build.include(inc);
            }
        }
    }
    build.compile("strata_mpi_shim");
}

fn main() {
    emit_torch_link_args();
    build_mpi_shim();
}
