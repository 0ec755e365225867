//! `--print-capabilities`: what the vhost-user backend program conventions ask a block backend
//! to print (QEMU's docs/interop/vhost-user.rst, "Backend program conventions").

/// The capabilities JSON: the device type and the optional block features vublk implements.
pub fn json() -> String {
    serde_json::json!({
        "type": "block",
        "features": ["read-only", "blk-file"]
    })
    .to_string()
}

#[cfg(test)]
mod tests {
    #[test]
    fn capabilities_name_block_type_and_features() {
        let v: serde_json::Value = serde_json::from_str(&super::json()).unwrap();
        assert_eq!(v["type"], "block");
        assert_eq!(v["features"], serde_json::json!(["read-only", "blk-file"]));
    }
}
