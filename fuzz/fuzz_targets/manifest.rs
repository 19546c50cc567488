//! AFL++ entry point; the checks live in the library.

fn main() {
    afl::fuzz!(|data: &[u8]| arcguard_fuzz::manifest(data));
}
