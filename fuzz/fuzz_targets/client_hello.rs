#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| lb_userspace::fuzz::client_hello(data));
