# Recur: the two commands of the quick start are `make demo` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-$(shell cksum pyproject.toml | cut -d' ' -f1)
RECIPE ?= ptb-lstm

.PHONY: install proto test test-gpu lint demo bench bench-train bench-export bench-serve bench-cache bench-quant bench-softmax bench-gpu fuzz soak clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --disable-pip-version-check -e '.[train,serve,dev]'
	rm -f $(VENV)/.installed-*
	touch $(STAMP)

install: $(STAMP)

# Regenerates serving/proto_gen from protos/ (tests/test_proto.py fails when it is stale).
proto: install
	$(BIN)/python protos/generate.py

lint: install
	$(BIN)/ruff check .

test: install lint
	$(BIN)/pytest

# On a machine with a CUDA GPU (CI has none): the gpu-marked tests, then the serving tests
# again with their servers on CUDA. Needs CUDA 13 and cuDNN 9 for onnxruntime-gpu.
SERVING_TESTS := tests/test_server.py tests/test_completion.py tests/test_encoder_service.py \
  tests/test_score_stream.py tests/test_server_errors.py tests/test_portable_sessions.py \
  tests/test_batch_score.py tests/test_model_updates.py tests/test_hostile_input.py \
  tests/test_client.py tests/test_scheduling.py
test-gpu: install
	$(BIN)/pytest -m gpu -v
	RECUR_TEST_DEVICE=cuda $(BIN)/pytest -m "not gpu" $(SERVING_TESTS)

# The main job end to end on the generated corpus: data, four models, evaluation, samples,
# export, then the server: every service called through the command line.
demo: install
	mkdir -p runs
	$(BIN)/recur data synth --out data/synth
	@for task in lm pos ner cls; do \
	  echo "== training demo-$$task (log: runs/demo-$$task.log)"; \
	  $(BIN)/recur train --config demo-$$task --out runs/demo-$$task > runs/demo-$$task.log 2>&1 \
	    || { tail -20 runs/demo-$$task.log; exit 1; }; \
	  $(BIN)/recur evaluate runs/demo-$$task --split test || exit 1; \
	done
	$(BIN)/recur evaluate runs/demo-lm --split test --probes data/synth/lm/probes.tsv
	$(BIN)/python -m training.data.synth data/synth/lm/test
	$(BIN)/recur generate runs/demo-lm --prompt "the old dogs that" --temperature 0.8 --seed 1 \
	  -n 3 --max-tokens 20
	rm -rf runs/models
	@for task in lm pos ner cls; do \
	  $(BIN)/recur export runs/demo-$$task --out runs/models/demo-$$task/1 || exit 1; \
	done
	$(BIN)/python tools/demo.py runs/models data/synth

bench: bench-export bench-serve bench-cache bench-train

# One recipe per run (long: needs an otherwise idle machine); results merged into bench/results/train.json.
bench-train: install
	$(BIN)/python -m bench.train --recipe $(RECIPE)

# The exported Loop graph against torch eager and ONNX's fused RNN operators (a few minutes).
bench-export: install
	$(BIN)/python -m bench.export

# The gRPC server against the runtime in process (a few minutes): latency, batching, streams.
bench-serve: install
	$(BIN)/python -m bench.serve

# The prefix cache on against off, two servers taking turns (under 10 minutes): multiple
# choice, completions sharing a prompt, memory per entry, a mixed workload's hit rate.
bench-cache: install
	$(BIN)/python -m bench.cache

# int8 export against float32 on runs/ptb-lstm (make bench-train RECIPE=ptb-lstm first) or
# RUN=any trained LM: scoring speed, one-token steps, test perplexity (a few minutes).
# Without a trained run: python -m bench.quant --random-model (the speed ratio alone).
bench-quant: install
	$(BIN)/python -m bench.quant $(if $(RUN),--run $(RUN))

# The full and the adaptive softmax, each in float32 and int8, on pairs of trained PTB runs
# (train them first: make bench-train RECIPE=ptb-lstm, then RECIPE=ptb-lstm-adaptive);
# ARGS="--pair FULL_RUN ADAPTIVE_RUN --pair ..." names others.
bench-softmax: install
	$(BIN)/python -m bench.softmax $(ARGS)

# The Loop graph on ONNX Runtime's CUDA provider against torch eager on CUDA (needs a GPU).
bench-gpu: install
	$(BIN)/python -m bench.gpu

# Valid and hostile requests at every RPC of a real server, checked (~5 min): bench/results/fuzz.json.
fuzz: install
	$(BIN)/python -m bench.fuzz --requests $(or $(REQUESTS),10000) --seed $(or $(SEED),0)

# Ten minutes of mixed traffic at 80% of the measured maximum against the demo models
# (make demo first): errors, latency and memory growth into bench/results/soak.json. Not in CI.
soak: install
	$(BIN)/python -m bench.soak runs/models --minutes $(or $(MINUTES),10)

clean:
	rm -rf $(VENV) runs data
