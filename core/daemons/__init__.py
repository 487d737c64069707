"""The external daemons the core runs: nfs-ganesha (NFS exports) and dnsmasq
(proxy-DHCP), their configuration from the registry and their supervision."""
