//! With the `cuda` feature, compile kernels/*.cu to PTX with nvcc (loaded at run time through
//! cudarc). The default CPU build runs nothing here and never needs nvcc.
use std::path::PathBuf;
use std::process::Command;

fn main() {
    println!("cargo:rerun-if-changed=kernels");
    println!("cargo:rerun-if-env-changed=DSA_CUDA_ARCH");
    if std::env::var_os("CARGO_FEATURE_CUDA").is_none() {
        return;
    }
    let out = PathBuf::from(std::env::var("OUT_DIR").unwrap());
    let nvcc = match std::env::var("CUDA_ROOT") {
        Ok(root) => PathBuf::from(root).join("bin/nvcc"),
        Err(_) => PathBuf::from("nvcc"),
    };
    // sm_90a: Hopper with its architecture-specific instructions (wgmma, setmaxnreg).
    let arch = std::env::var("DSA_CUDA_ARCH").unwrap_or_else(|_| "sm_90a".into());
    // The wgmma kernels exist only in an sm_90a build (kernels::sparse_mla_tc::wgmma_forward).
    println!("cargo:rustc-env=DSA_CUDA_ARCH_BUILT={arch}");
    for entry in std::fs::read_dir("kernels").expect("kernels/ exists") {
        let path = entry.unwrap().path();
        if path.extension().is_none_or(|e| e != "cu") {
            continue;
        }
        let ptx = out.join(path.file_stem().unwrap()).with_extension("ptx");
        let status = Command::new(&nvcc)
            .args([
                "--ptx",
                &format!("-arch={arch}"),
                "-O3",
                "-std=c++17",
                "-lineinfo",
                "-o",
            ])
            .arg(&ptx)
            .arg(&path)
            .status()
            .unwrap_or_else(|e| panic!("cannot run {}: {e} (set CUDA_ROOT)", nvcc.display()));
        assert!(status.success(), "nvcc failed on {}", path.display());
    }
}
