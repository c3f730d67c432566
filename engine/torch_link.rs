// Shared build-script logic (included by engine/, launcher/ and tests/ build.rs): emits an
// rpath to libtorch's lib/ directory so binaries and test executables find libtorch at run
// time without LD_LIBRARY_PATH, and links `torch_cuda` with --no-as-needed so that CUDA is
// visible at run time when the libtorch build has it.
//
// The lib directory comes from LIBTORCH (set by scripts/setup.sh in .cargo/config.toml),
// LIBTORCH_LIB, or, with LIBTORCH_USE_PYTORCH, from the active python's torch package.

use std::path::PathBuf;

fn torch_lib_dir() -> Option<PathBuf> {
    for var in ["LIBTORCH", "LIBTORCH_LIB", "LIBTORCH_USE_PYTORCH"] {
        println!("cargo:rerun-if-env-changed={var}");
    }
    if let Ok(dir) = std::env::var("LIBTORCH_LIB").or_else(|_| std::env::var("LIBTORCH")) {
        return Some(PathBuf::from(dir).join("lib"));
    }
    if std::env::var_os("LIBTORCH_USE_PYTORCH").is_some() {
        let python = if std::env::var_os("VIRTUAL_ENV").is_some() { "python" } else { "python3" };
        let out = std::process::Command::new(python)
            .args(["-W", "ignore", "-c", "import os, torch; print(os.path.dirname(torch.__file__))"])
            .output()
            .ok()?;
        let dir = String::from_utf8(out.stdout).ok()?;
        return Some(PathBuf::from(dir.trim()).join("lib"));
    }
    None
}

fn emit_torch_link_args() {
    let Some(lib) = torch_lib_dir() else {
        println!(
            "cargo:warning=libtorch location unknown (no LIBTORCH / LIBTORCH_USE_PYTORCH): \
             run scripts/setup.sh first"
        );
        return;
    };
    println!("cargo:rustc-link-arg=-Wl,-rpath,{}", lib.display());
    if lib.join("libtorch_cuda.so").exists() {
        println!("cargo:rustc-link-arg=-L{}", lib.display());
        println!("cargo:rustc-link-arg=-Wl,--no-as-needed");
        println!("cargo:rustc-link-arg=-ltorch_cuda");
        println!("cargo:rustc-link-arg=-Wl,--as-needed");
    }
}
