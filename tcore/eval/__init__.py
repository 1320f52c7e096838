"""Label-propagation evaluation (METHOD.md section 7, the CRW protocol).

Modules: `features` (frozen backbone -> L2-normalised patch maps), `propagation` (top-k
affinity propagation), `segment` (mask propagation for DAVIS / VIP), `davis`, `vip`, `jhmdb`
(datasets, protocols, results), `metrics` (J, F, statistics, mIoU, PCK), `io` (palette PNGs,
atomic writes), `report` (results.json / results.csv / tables), `visualize` (overlay strips),
`checkpoint` (the backbone to evaluate from any supported checkpoint).
"""
