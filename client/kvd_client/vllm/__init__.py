"""kvd's vLLM connector (KV connector API v1), split the way vLLM splits its own offloading connector.

vLLM loads `kvd_client.vllm.connector:KvdConnector` (`kvd_client.vllm_connector:KvdConnector` is an alias kept for
existing configurations). The facade delegates to:

- `scheduler`: lookups, admission and the per-step plan of loads and saves (EngineCore process);
- `worker`: hands the plan to the kvd client and reports completions (model worker process);
- `metadata`: what travels from the scheduler to every worker each step;
- `stats`: the counters vLLM logs as "KV Transfer metrics";
- `fingerprint`: the namespace fingerprint, from configuration alone;
- `clients`: the kvd client one process shares between the connector's roles;
- `config`: `kv_connector_extra_config`, parsed once into a typed object;
- `compat`: the supported vLLM releases and what differs between them.

Nothing here is imported by `import kvd_client`: only these modules import vLLM.
"""
