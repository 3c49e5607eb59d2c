"""The VM tier: ``test_vm_tier.py`` runs on the host and boots one VM in which
pytest runs ``guest/`` with ``VIPLESS_IN_VM=1``. Outside the VM the guest tests are
not collected (they need IPVS, which the host kernel may lack); inside it the host
test is not collected (no VM in the VM)."""

import os

IN_VM = os.environ.get("VIPLESS_IN_VM") == "1"

collect_ignore_glob = ["test_vm_tier.py"] if IN_VM else ["guest/*"]
