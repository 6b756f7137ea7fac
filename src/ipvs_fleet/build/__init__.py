"""Build the fix module ip_vs_reuse per kernel release: builder roots, artifacts, DKMS."""
