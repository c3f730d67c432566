//! `scripts/setup.sh` decides whether to install `libclang-dev` from the package database,
//! not from a file glob: a machine with only `libclang-cpp14` (whose `libclang-cpp.so.14`
//! matches `libclang*.so*` but is not the libclang bindgen loads) must get `libclang-dev`.
//!
//! The script runs under a PATH of stubs: `dpkg-query` answers from a fake package
//! database (glob patterns matched the way dpkg-query matches them), `apt-get` records
//! what it was asked to install, and no `cargo` is on the PATH, so the script stops with
//! exit 2 right after the apt step and never touches the torch venv.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use strata_tests::{repo_root, scratch};

/// Writes an executable script `name` into `dir`.
fn stub(dir: &Path, name: &str, body: &str) {
    let path = dir.join(name);
    fs::write(&path, format!("#!/bin/bash\n{body}\n")).unwrap();
    fs::set_permissions(&path, fs::Permissions::from_mode(0o755)).unwrap();
}

/// A PATH directory holding the stubs and the few real tools the script's apt step uses.
fn stub_path(dir: &Path, installed: &[&str]) -> PathBuf {
    let bin = dir.join("bin");
    fs::create_dir_all(&bin).unwrap();
    for tool in ["grep", "dirname", "id", "cat"] {
        let real = ["/usr/bin", "/bin"]
            .iter()
            .map(|d| Path::new(d).join(tool))
            .find(|p| p.exists())
            .unwrap_or_else(|| panic!("{tool} not found"));
        std::os::unix::fs::symlink(real, bin.join(tool)).unwrap();
    }
    let db = dir.join("dpkg-status");
    fs::write(&db, installed.join("\n") + "\n").unwrap();
    // `dpkg-query -W -f=FORMAT PATTERN...`: one line per package matching a pattern, in
    // the "${Status} ${Package}" format the script asks for; unknown patterns print nothing.
    stub(
        &bin,
        "dpkg-query",
        &format!(
            r#"shift 2
while read -r line; do
  pkg="${{line##* }}"
  for pat in "$@"; do
    [[ $pkg == $pat ]] && {{ echo "$line"; break; }}
  done
done < {db}
exit 0"#,
            db = db.display()
        ),
    );
    stub(&bin, "dpkg", "exit 1");
    stub(&bin, "sudo", "exec \"$@\"");
    stub(
        &bin,
        "apt-get",
        &format!(
            "echo \"$*\" >> {}\nexit 0",
            dir.join("apt-get.log").display()
        ),
    );
    bin
}

/// Runs the script's apt step against a fake package database; returns what apt-get
/// was asked to install.
fn apt_install_args(name: &str, installed: &[&str]) -> String {
    let dir = scratch(name);
    let bin = stub_path(&dir, installed);
    let out = Command::new("/bin/bash")
        .arg(repo_root().join("scripts/setup.sh"))
        .env_clear()
        .env("PATH", &bin)
        .env("HOME", &dir)
        .env("STRATA_CACHE", dir.join("cache"))
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    // No cargo on the stub PATH: the script stops after the apt step, before any venv.
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("cargo not found"), "{stderr}");
    assert!(!dir.join("cache").exists(), "the venv step ran: {stderr}");
    let log = fs::read_to_string(dir.join("apt-get.log")).unwrap_or_default();
    log.lines()
        .find(|l| l.starts_with("install"))
        .unwrap_or_default()
        .to_string()
}

fn installs_libclang_dev(args: &str) -> bool {
    args.split_whitespace().any(|w| w == "libclang-dev")
}

#[test]
fn libclang_cpp_alone_gets_libclang_dev_installed() {
    let args = apt_install_args(
        "setup-cpp-only",
        &[
            "install ok installed libclang-cpp14",
            "install ok installed libclang1-14",
            "install ok installed libllvm14",
        ],
    );
    assert!(installs_libclang_dev(&args), "apt-get install {args}");
}

#[test]
fn an_installed_libclang_dev_of_any_version_is_kept() {
    for (name, pkg) in [
        ("setup-dev-versioned", "libclang-14-dev"),
        ("setup-dev-plain", "libclang-dev"),
    ] {
        let args = apt_install_args(
            name,
            &[
                "install ok installed libclang-cpp14",
                &format!("install ok installed {pkg}"),
            ],
        );
        assert!(
            !installs_libclang_dev(&args),
            "{pkg}: apt-get install {args}"
        );
    }
}

#[test]
fn a_removed_libclang_dev_counts_as_missing() {
    let args = apt_install_args(
        "setup-dev-removed",
        &[
            "install ok installed libclang-cpp14",
            "deinstall ok config-files libclang-14-dev",
        ],
    );
    assert!(installs_libclang_dev(&args), "apt-get install {args}");
}

#[test]
fn this_machine_has_libclang_dev_by_the_same_check() {
    // The CI machine builds mpi-sys, so the check must say so here.
    let out = Command::new("bash")
        .arg(repo_root().join("scripts/setup.sh"))
        .arg("--check-libclang")
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "present");
}
