"""Build the patched IPVS module set per kernel release: builder roots, artifacts, DKMS."""
