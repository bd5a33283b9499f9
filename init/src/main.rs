//! `tandem-init`: placeholder until the init issue lands.

fn main() {
    eprintln!("tandem-init: not implemented yet");
    std::process::exit(2);
}
