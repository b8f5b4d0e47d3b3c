# The two commands of the README. Each creates .venv when missing and reuses it.
# torch is pinned first so pip takes the CPU build on disk instead of a multi-GB CUDA one;
# set TORCH_SPEC= (empty) to keep whatever torch the environment already has.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.tensortap-installed

.PHONY: test demo venv clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install -q $(TORCH_SPEC)
	$(BIN)/python -m pip install -q -e '.[torch,test]'
	touch $(STAMP)

venv: $(STAMP)

# Then the client-hook tests once more with every tensor through the CUDA statistics kernels,
# run on CPU in Triton's interpreter (skipped where Triton is not installed).
test: $(STAMP)
	$(BIN)/python -m pytest -q -p no:cacheprovider
	@if $(BIN)/python -c "import triton" 2>/dev/null; then \
		echo "client hooks through the fused kernels (Triton interpreter):"; \
		TRITON_INTERPRET=1 TENSORTAP_FUSED_ON_CPU=1 $(BIN)/python -m pytest -q -p no:cacheprovider tests/client_hooks; \
	else echo "Triton not installed: the fused-kernel pass is skipped"; fi

demo: $(STAMP)
	DEBUG_FNO_LOSS=1 $(BIN)/python -m examples.grid_lines.compare --N 64 --gridsize 1 \
		--output-dir outputs/debug_fno_loss --architectures fno,hybrid --nepochs 1 \
		--torch-epochs 1 --torch-loss-mode mae

clean:
	rm -rf $(VENV) .artifacts outputs
