"""Attention pool (Lamina-style attention offloading): worker processes that hold the KV
cache of the cloud layers, partitioned by KV head, and compute decode attention over gRPC
(`tandem.attn.v1.AttentionWorker`). `kv_store` is a worker's cache, `worker` its gRPC
servicer, `main` starts a pool of N worker processes, `client` is the compute side's view."""
