include!("../engine/torch_link.rs");

fn main() {
    emit_torch_link_args();
}
