#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| lb_userspace::fuzz::kv_record(data));
