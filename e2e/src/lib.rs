//! End-to-end tests of arcguard against a real kube-apiserver and etcd.
//!
//! The harness builds (or reuses) kube-apiserver and etcd from source
//! (`e2e/build-controlplane.sh`), starts them on free loopback ports with their own
//! certificates, installs the CRDs, starts `arcguard serve --cluster` out of cluster with the
//! admin kubeconfig, registers arcguard's webhook configurations from `manifests/base` with URL
//! client configs, and waits until arcguard enforces. See `e2e/README.md`.

pub mod arcguard;
pub mod bins;
pub mod cluster;
pub mod controlplane;
pub mod failure_policy;
pub mod latency;
pub mod load;
pub mod noop_webhook;
pub mod pki;
pub mod process;
pub mod registry;
pub mod signing;
pub mod token_service;
pub mod tools;

pub use cluster::{
    Cluster, ClusterOptions, UNTRUSTED_MESSAGE, apply, apply_yaml, calico_api, denial, eventually,
    install_report_crds, namespace, pod, pods_before_policies, shared, wait_for_enforcement,
    webhook_configurations,
};
