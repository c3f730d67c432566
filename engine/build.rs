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

/// Compiles the C++ shims for what tch does not bind (libtorch post-accumulate-grad hooks,
/// a backward seeded with given gradients) and Strata's causal-attention kernel, against the libtorch headers tch links
/// (`LIBTORCH`).
fn build_torch_shims() {
    println!("cargo:rerun-if-changed=src/dp/grad_hook.cpp");
    println!("cargo:rerun-if-changed=src/model/seeded_backward.cpp");
    println!("cargo:rerun-if-changed=src/model/causal_attention.cpp");
    println!("cargo:rerun-if-changed=src/model/shim_error.h");
    let root = std::env::var("LIBTORCH")
        .map(PathBuf::from)
        .ok()
        .or_else(|| torch_lib_dir().and_then(|lib| lib.parent().map(std::path::Path::to_path_buf)));
    let Some(root) = root else {
        panic!("libtorch location unknown (no LIBTORCH); run scripts/setup.sh");
    };
    let abi = std::env::var("LIBTORCH_CXX11_ABI").unwrap_or_else(|_| "1".into());
    println!("cargo:rerun-if-env-changed=LIBTORCH_CXX11_ABI");
    cc::Build::new()
        .cpp(true)
        .file("src/dp/grad_hook.cpp")
        .file("src/model/seeded_backward.cpp")
        .file("src/model/causal_attention.cpp")
        .include(root.join("include"))
        .include(root.join("include/torch/csrc/api/include"))
        .flag_if_supported("-std=c++17")
        .flag_if_supported("-w")
        .flag_if_supported("-Wno-psabi")
        .define("_GLIBCXX_USE_CXX11_ABI", abi.as_str())
        .compile("strata_torch_shims");
    println!(
        "cargo:rustc-link-search=native={}",
        root.join("lib").display()
    );
    println!("cargo:rustc-link-lib=dylib=torch_cpu");
    println!("cargo:rustc-link-lib=dylib=c10");
}

fn main() {
    emit_torch_link_args();
    build_mpi_shim();
    build_torch_shims();
}
