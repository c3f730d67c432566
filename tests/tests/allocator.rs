//! `train.allocator` (engine::alloc) changes where glibc serves tensor memory from: with
//! `release` a 4 MiB tensor is its own mapping (returned to the system when dropped), and
//! with `retain` even a 64 MiB tensor (above glibc's largest dynamic mmap threshold,
//! 32 MiB) comes from the heap and its block is reused. The policy is process-wide
//! and a rank allocates on its main thread (glibc's main arena), so this file is its own
//! test binary whose checks run in `main` (`harness = false`).

use engine::alloc::{apply, held_bytes};
use engine::config::AllocatorPolicy;
use engine::tch::{Kind, Tensor};

const MIB: usize = 1 << 20;

fn tensor(mib: usize) -> Tensor {
    Tensor::zeros(
        [(mib * MIB / 4) as i64],
        (Kind::Float, engine::tch::Device::Cpu),
    )
}

fn main() {
    release_maps_large_tensors_and_retain_keeps_them_in_the_heap();
    println!("test release_maps_large_tensors_and_retain_keeps_them_in_the_heap ... ok");
}

fn release_maps_large_tensors_and_retain_keeps_them_in_the_heap() {
    // glibc's default: freeing a 16 MiB mapping raises the mmap threshold past 4 MiB.
    apply(AllocatorPolicy::System).unwrap();
    drop(tensor(16));
    let (mapped_before, _) = held_bytes();
    let in_heap = tensor(4);
    assert_eq!(
        held_bytes().0,
        mapped_before,
        "system: 4 MiB now comes from the heap"
    );

    apply(AllocatorPolicy::Release).unwrap();
    let (mapped_before, _) = held_bytes();
    let t = tensor(4);
    let (mapped, _) = held_bytes();
    assert!(
        mapped >= mapped_before + 4 * MIB,
        "release: a 4 MiB tensor should be mmapped ({mapped_before} -> {mapped} bytes)"
    );
    drop(t);
    assert!(
        held_bytes().0 < mapped,
        "release: the mapping goes back when freed"
    );
    drop(in_heap);

    apply(AllocatorPolicy::Retain).unwrap();
    let (mapped_before, heap_before) = held_bytes();
    let t = tensor(64);
    let (mapped, heap) = held_bytes();
    assert_eq!(mapped, mapped_before, "retain: nothing is mmapped");
    assert!(
        heap >= heap_before + 64 * MIB,
        "retain: the heap holds the tensor"
    );
    drop(t);
    let again = tensor(32);
    assert_eq!(
        held_bytes(),
        (mapped, heap),
        "retain: the freed block is reused"
    );
    drop(again);
    assert_eq!(held_bytes().1, heap, "retain: the heap is not trimmed");
}
