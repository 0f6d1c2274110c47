"""What pruning buys: FLOPs by part (``flops``: analytic and counted on a meta-device model),
prefill latency and decode throughput (``latency``), KV-cache bytes (``memory``), and what a
method's schedule could buy at no scoring cost on this machine (``attainable``)."""
