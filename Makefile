# Two commands for a newcomer on a fresh Debian machine (as root):
#   make demo   - install, boot the lab fleet, run the main job on it, print a summary
#   make test   - install and run the test suite, lab end-to-end tests included (CI's command)
#   make test-full - the same plus the long lab tests (`slow`: the 50-host simulated fleet,
#                    the whole reuse matrix)
#   make test-7.2  - the 7.2 line (Debian unstable) on its own one-VM lab (not in CI's time)
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test test-full test-7.2 test-dkms unit unit-py313 lint deps venv lock clean lab-down

deps: .deps-installed
.deps-installed: deps/apt-packages.txt
	@if [ "$$(id -u)" = 0 ]; then \
	  apt-get update -q >/dev/null && \
	  DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
	    $$(grep -v '^#' deps/apt-packages.txt) >/dev/null; \
	else echo "not root: make sure these are installed: $$(grep -v '^#' deps/apt-packages.txt)"; fi
	@touch $@

venv: $(STAMP)
$(STAMP): pyproject.toml requirements.lock
	@command -v $(PY) >/dev/null || { echo "need $(PY) (pyenv install 3.11 or apt python3.11)"; exit 1; }
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q -U pip
	@# uv installs the lock's wheels in parallel: 6 s against pip's 21 s, no cache (make demo
	@# cold). uv itself comes from the lock, by its hashes; pip does the rest if uv fails.
	awk '/^uv==/ {p = 1; print; next} p && /^[^ ]/ {p = 0} p' requirements.lock > $(VENV)/uv.req
	$(BIN)/pip install -q --require-hashes --no-deps -r $(VENV)/uv.req
	$(BIN)/uv pip install -q --native-tls --python $(BIN)/python --require-hashes -r requirements.lock \
	  || $(BIN)/pip install -q --require-hashes -r requirements.lock
	$(BIN)/pip install -q --no-deps --no-build-isolation -e .
	@touch $@

# requirements.lock: every dependency (extras ansible, plots, dev) with hashes, one lock for
# Python 3.11-3.13 (markers where they differ). After a change to pyproject.toml's
# dependencies: make lock, then commit it with pyproject.toml.
lock: venv
	$(BIN)/uv pip compile pyproject.toml --extra dev --universal --python-version 3.11 \
	  --generate-hashes -o requirements.lock

# ansible-lint runs in the collection's folder (its .ansible-lint: production profile), the
# collection found from the checkout's root as when run by FQCN (its role is roles/ipvs_fleet,
# linked in). antsibull-changelog checks the changelog fragments; ansible-test sanity runs on
# the collection as built (python -m ipvs_fleet.collection: the role copied in).
COLLECTION := ansible_collections/ipvs_fleet/fleet
lint: venv
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	cd $(COLLECTION) && PATH=$(CURDIR)/$(BIN):$$PATH ANSIBLE_COLLECTIONS_PATH=$(CURDIR) NO_COLOR=1 \
	  $(CURDIR)/$(BIN)/ansible-lint --nocolor -q
	cd $(COLLECTION) && $(CURDIR)/$(BIN)/antsibull-changelog lint
	$(BIN)/python -m ipvs_fleet.collection --sanity

# The hermetic tier: no network, no VM, no module build (kernel pins from the lock); ~30 s.
unit: venv
	$(BIN)/pytest -m 'not lab'

# The unit tier on Python 3.13 (Debian trixie's, in an mmdebstrap root; root needed).
unit-py313:
	.ci/unit-python trixie python3.13

# The lab tests need the module artifacts and the booted lab: build the one while the other
# boots (mostly downloads and dpkg on one side, QEMU on the other), lint in that wait too.
# Then the lab tier (the VMs) runs in the foreground, and beside it, at lower CPU priority,
# everything that needs no VM: the unit tier on the venv's Python and on 3.13 (make
# unit-py313), the builder-root builds and checkpatch (`build`), the wheel in a fresh venv
# (`pypi`). They use the CPU the TCG guests leave idle (a third of it during the lab tests,
# measured on test_checks.py: 438 busy and 205 idle CPU-seconds in 322 s on 2 cores).
# nice 5, not 19: at 19 (tried on e0c7ed5) the wheel test's `python -m venv`, starved by the
# busy guests, passed its 120 s subprocess timeout and failed make test.
# .ci/test main runs it all (the streams, their logs in reports/, the summary lines).
# The lab tests run in two steps. First the kernel tier (LAB_FIRST: the lab, the module sets,
# the reuse scenarios) keeps the three guests busy. Then the rest of the main lab's tests
# and, beside them, the `side_lab` tests on a two-VM lab of their own (SIDE_FLEET: the
# activation faults, the locked-down host, sudo, the gate's halt). Those work on the canary
# alone: on the main lab they kept one core busy and the other idle for 16 minutes (/proc/stat
# every 30 s: 30 busy and 29 idle CPU-seconds).
TEST_LAB := .lab/test
TEST_ARTIFACTS := .test-artifacts
SIDE_LAB := .lab/test-side
SIDE_FLEET := lab/fleet-side.yml
LAB_FIRST := tests/lab/test_lab.py tests/lab/test_modules.py tests/lab/test_reuse.py \
	tests/lab/test_kernel_selftest.py tests/lab/test_upstream_selftest.py
# `make test` (CI) leaves out the `slow` lab tests; `make test-full` runs them too.
TEST_MARKS ?= not dkms and not slow
# The two streams split by folder: tests/lab needs the VMs, nothing else does (the CI
# examples are marked `pypi` and use the VMs: a marker split ran them beside the lab tests).
test-full: TEST_MARKS := not dkms
test-full: export IPVS_FLEET_TEST_FULL := 1
test-full: test
test: deps venv
	@BIN=$(BIN) TEST_MARKS='$(TEST_MARKS)' TEST_LAB=$(TEST_LAB) TEST_ARTIFACTS=$(TEST_ARTIFACTS) \
	  SIDE_LAB=$(SIDE_LAB) SIDE_FLEET=$(SIDE_FLEET) LAB_FIRST='$(LAB_FIRST)' .ci/test main

# The 7.2 line (Debian unstable's cloud kernel) on a lab of its own (lab/fleet-7.2.yml, one
# VM): apart from `make test` because CI's time budget is spent. Builds the 7.2 fix module
# while the VM boots, then runs the lab tests that apply to one host of that line: the deploy,
# 100 connections held across its rollback and deploy, its no-op rerun, the compliance checks
# (all pass, then a hand-changed sysctl fails), the fix module, the line's reduced reuse
# matrix, the kernel's own ipvs.sh with the module, and the upstream series' kselftest
# (passes on its patch, fails on stock).
LAB_72 := .lab/test-7.2
FLEET_72 := lab/fleet-7.2.yml
TESTS_72 := tests/lab/test_deploy.py::test_fresh_deploy_converges_every_host \
	tests/lab/test_deploy.py::test_connections_in_flight_survive_rollback_and_activation_on_every_line \
	tests/lab/test_deploy.py::test_second_run_changes_nothing \
	tests/lab/test_checks.py::test_converged_lab_is_compliant \
	tests/lab/test_checks.py::test_hand_changed_sysctl_is_drift_with_converge_command \
	tests/lab/test_modules.py::test_fix_module_loads_beside_the_stock_ip_vs_and_identifies_itself \
	tests/lab/test_reuse.py tests/lab/test_upstream_selftest.py tests/lab/test_kernel_selftest.py
test-7.2: export IPVS_FLEET_FLEET := $(FLEET_72)
test-7.2: deps venv lint
	@BIN=$(BIN) TEST_ARTIFACTS=$(TEST_ARTIFACTS) LAB_72=$(LAB_72) TESTS_72='$(TESTS_72)' \
	  .ci/test 7.2

# Build mode on a VM of its own (image with dkms, gcc, headers, linux-source; the DKMS build
# runs under TCG): minutes, so apart from `make test`.
test-dkms: deps venv
	$(BIN)/pytest -m dkms tests/lab/test_dkms.py

# The demo boots the lab while it builds the modules (ipvs_fleet/demo.py), as `test` does.
demo: deps venv
	$(BIN)/ipvs-fleet demo $(if $(FLEET),--fleet $(FLEET))

lab-down: venv
	$(BIN)/ipvs-fleet lab down

clean: lab-down
	-$(BIN)/ipvs-fleet lab --lab-dir $(TEST_LAB) down
	rm -rf .lab artifacts reports $(TEST_ARTIFACTS) .simfleet
