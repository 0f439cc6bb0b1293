//! A client-only crate: no `rpc-server` in its dependencies.

#![allow(missing_docs, unreachable_pub)] // generated code

pub mod shop {
    pub mod v1 {
        rpc_client::include_proto!("shop.v1");
    }
}
pub mod common {
    pub mod v1 {
        rpc_client::include_proto!("common.v1");
    }
}

/// The typed clients over one `rpc_client::Client`.
pub fn clients(
    client: rpc_client::Client,
) -> (
    shop::v1::clock_client::ClockClient<rpc_client::Client>,
    shop::v1::catalog_client::CatalogClient<rpc_client::Client>,
) {
    (
        shop::v1::clock_client::ClockClient::new(client.clone()),
        shop::v1::catalog_client::CatalogClient::new(client),
    )
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_client_only_crate_has_clients_and_messages() {
        use prost::Message;
        let req = super::shop::v1::ItemRequest {
            name: "hammer".into(),
            currency: super::common::v1::Currency::Eur as i32,
        };
        let back = super::shop::v1::ItemRequest::decode(req.encode_to_vec().as_slice()).unwrap();
        assert_eq!(back, req);
        // The generated server module is absent: this names only the client.
        let _: fn(rpc_client::Client) -> super::shop::v1::clock_client::ClockClient<rpc_client::Client> =
            super::shop::v1::clock_client::ClockClient::new;
    }
}
