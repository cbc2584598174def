//! Build script: with the `rbd` feature, generates the librbd/librados bindings with bindgen over
//! the system headers (Debian's `librbd-dev`, `librados-dev`) and links both libraries. Without
//! the feature it does nothing, so a default build needs no Ceph at all.

fn main() {
    #[cfg(feature = "rbd")]
    rbd::generate();
}

#[cfg(feature = "rbd")]
mod rbd {
    use std::path::PathBuf;

    /// The one header bindgen reads: librbd's C API pulls in librados' (its I/O context type).
    const WRAPPER: &str = "#include <rados/librados.h>\n#include <rbd/librbd.h>\n";

    pub fn generate() {
        println!("cargo:rerun-if-changed=build.rs");
        println!("cargo:rustc-link-lib=rbd");
        println!("cargo:rustc-link-lib=rados");
        let bindings = bindgen::Builder::default()
            .header_contents("cryptnbd_rbd.h", WRAPPER)
            // Only what src/backend/rbd/ffi.rs uses: a narrow surface is easier to audit.
            .allowlist_function("rados_(create2?|conf_read_file|conf_parse_env|conf_set|connect|shutdown|ioctx_create|ioctx_destroy|getaddrs|get_instance_id)")
            // RADOS objects for the key store (src/backend/rbd/rados_obj.rs).
            .allowlist_function("rados_(ioctx_set_namespace|read|stat|remove|get_last_version|create_write_op|release_write_op|write_op_(assert_version|create|write_full|operate)|watch2|unwatch2|watch_check|watch_flush|notify2|notify_ack|buffer_free)")
            .allowlist_function("rbd_(create4|open|open_read_only|close|remove|get_size|resize|stat|get_features)")
            .allowlist_function("rbd_aio_(read|write|discard|write_zeroes|flush|create_completion|get_return_value|release)")
            .allowlist_function("rbd_(diff_iterate2|lock_acquire|lock_release|lock_get_owners|lock_get_owners_cleanup|lock_break|is_exclusive_lock_owner|watchers_list|watchers_list_cleanup)")
            .allowlist_function("rbd_image_options_(create|destroy|set_uint64)")
            .allowlist_function("rbd_(snap_create|snap_list|snap_list_end|snap_remove|snap_get_namespace_type|clone3|get_parent|linked_image_spec_cleanup|linked_image_spec_list_cleanup|snap_spec_cleanup|list_children3|flatten_with_progress)")
            .allowlist_type("rbd_lock_mode_t|rbd_image_watcher_t|rbd_image_info_t")
            .allowlist_var("RBD_(FEATURE|IMAGE_OPTION)_.*")
            .rustified_enum("rbd_lock_mode_t")
            .layout_tests(false)
            .generate()
            .expect("bindgen could not read <rbd/librbd.h>: install librbd-dev, librados-dev and libclang-dev");
        let out = PathBuf::from(std::env::var("OUT_DIR").expect("OUT_DIR is set by cargo"));
        bindings
            .write_to_file(out.join("rbd_bindings.rs"))
            .expect("writing the generated RBD bindings");
    }
}
