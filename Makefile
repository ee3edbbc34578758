# HLC reproducibility kit. `make help` lists the targets; `make -n all DATASET=imagenet_lt` previews a chain.
SHELL := bash
.DELETE_ON_ERROR:
.SUFFIXES:
.DEFAULT_GOAL := all

# ---- knobs (override on the command line: make all DATASET=places_lt DATA_ROOT=/data/places365) ----
DATASET   ?= toy
DATA_ROOT ?= data/$(DATASET)
RUN       ?= runs/$(DATASET)
SEED      ?= 0
DEVICE    ?= auto
DECODE    ?= pil
FEATURE_CACHE ?= $(RUN)/cache
ifeq ($(DATASET),toy)
MODEL       ?= $(DATA_ROOT)/clip/toy-clip.json
PRETRAINED  ?= $(DATA_ROOT)/clip/toy-clip.pt
EPOCHS      ?= 30
DESCRIPTORS ?= $(DATA_ROOT)/descriptors.json
WIKI        ?= $(DATA_ROOT)/wiki
TOY_DATA    := $(DATA_ROOT)/.complete
TRAIN_ARGS  ?= --batch-size 32 --lr 5e-3 --workers 2
EVAL_ARGS   ?= --workers 2
else
MODEL       ?= ViT-B-16-quickgelu
PRETRAINED  ?= openai
EPOCHS      ?= 30
DESCRIPTORS ?= $(wildcard $(DATA_ROOT)/descriptors.json)
WIKI        ?= $(wildcard $(DATA_ROOT)/wiki)
TOY_DATA    :=
endif
LLM_MODEL   ?=
CORPUS_ARGS ?=
FEATURE_ARGS ?=
TRAIN_ARGS  ?=
EVAL_ARGS   ?=

# ---- GPUS=N runs stages 03 and 04 under torchrun, one process per GPU (TORCHRUN_ARGS for several nodes) ----
GPUS ?=
TORCHRUN_ARGS ?=
LAUNCH = $(if $(GPUS),$(PY) -m torch.distributed.run --nproc_per_node=$(GPUS) $(or $(TORCHRUN_ARGS),--standalone),$(PY))

# ---- python: a virtual environment from requirements.txt, unless PY points at your own interpreter ----
VENV := .venv
PY   ?= $(VENV)/bin/python
SETUP := $(if $(filter $(VENV)/bin/python,$(PY)),$(VENV)/.installed)

# ---- each stage's arguments; written to $(RUN)/params/<stage> only when they change, so make re-runs
#      exactly the stages whose inputs or knobs changed ----
CORPUS_PARAMS  := --dataset $(DATASET) --data-root $(DATA_ROOT) --seed $(SEED) \
                  $(if $(WIKI),--wiki $(WIKI)) $(if $(DESCRIPTORS),--descriptors $(DESCRIPTORS)) \
                  $(if $(LLM_MODEL),--llm-model $(LLM_MODEL)) $(CORPUS_ARGS)
FEATURE_PARAMS := --model $(MODEL) --pretrained $(PRETRAINED) --device $(DEVICE) $(FEATURE_ARGS)
TRAIN_PARAMS   := --dataset $(DATASET) --data-root $(DATA_ROOT) --model $(MODEL) --pretrained $(PRETRAINED) \
                  --epochs $(EPOCHS) --seed $(SEED) --device $(DEVICE) --decode $(DECODE) \
                  --feature-cache $(FEATURE_CACHE) $(TRAIN_ARGS)
EVAL_PARAMS    := --dataset $(DATASET) --data-root $(DATA_ROOT) --model $(MODEL) --pretrained $(PRETRAINED) \
                  --device $(DEVICE) --seed $(SEED) --decode $(DECODE) --feature-cache $(FEATURE_CACHE) $(EVAL_ARGS)
write_params = $(shell mkdir -p $(RUN)/params && echo '$(strip $(2))' | cmp -s - $(RUN)/params/$(1) \
                 || echo '$(strip $(2))' > $(RUN)/params/$(1))
ifneq ($(filter-out help test test-fast setup clean clean-toy bench,$(or $(MAKECMDGOALS),all)),)
_ := $(call write_params,corpus,$(CORPUS_PARAMS))$(call write_params,features,$(FEATURE_PARAMS))
_ := $(call write_params,train,$(TRAIN_PARAMS))$(call write_params,eval,$(EVAL_PARAMS))
endif

.PHONY: all corpus features train eval test test-fast setup help clean clean-toy toy table4 table6 table7 tables bench

all: $(RUN)/results.json ## the whole chain: corpus -> text features -> training -> evaluation
	@cat $(RUN)/results.md

corpus: $(RUN)/corpus.json ## stage 01: class names, text corpus, descriptors
features: $(RUN)/text_features.pt ## stage 02: cached CLIP text features
train: $(RUN)/coarse.pt ## stage 03: prompts, classifier, descriptor weights
eval: $(RUN)/results.json ## stage 04: variants, K sweep, predictions, explanations
toy: $(DATA_ROOT)/.complete ## stage 00: build the toy world (DATASET=toy only)

$(DATA_ROOT)/.complete: 00_make_toy.py common.py $(SETUP)
	$(PY) 00_make_toy.py --out $(DATA_ROOT) --seed $(SEED)

ifeq ($(DATASET),toy)
$(DESCRIPTORS): $(TOY_DATA) ;
endif

$(RUN)/corpus.json: 01_build_corpus.py llm.py common.py $(RUN)/params/corpus $(DESCRIPTORS) $(TOY_DATA) $(SETUP)
	$(PY) 01_build_corpus.py $(CORPUS_PARAMS) --out $@

$(RUN)/text_features.pt: 02_cache_descriptors.py common.py $(RUN)/corpus.json $(RUN)/params/features
	$(PY) 02_cache_descriptors.py --corpus $(RUN)/corpus.json $(FEATURE_PARAMS) --out $@

$(RUN)/coarse.pt: 03_train_coarse.py common.py $(RUN)/text_features.pt $(RUN)/params/train
	$(LAUNCH) 03_train_coarse.py --features $(RUN)/text_features.pt $(TRAIN_PARAMS) --out $@

$(RUN)/results.json: 04_eval_hlc.py common.py $(RUN)/coarse.pt $(RUN)/text_features.pt $(RUN)/params/eval
	$(LAUNCH) 04_eval_hlc.py --features $(RUN)/text_features.pt --coarse $(RUN)/coarse.pt $(EVAL_PARAMS) --out $@

# ---- the paper's tables. Table 4: one training per ablation row, each in its own run directory
#      $(RUN)/ablation/<row>/ with the switches below (recorded in its meta); the full model is $(RUN) itself ----
ABLATION_lp     := --prompt-tokens 0 --corpus-ratio 0 --mixup-alpha 0 --desc-loss-weight 0
ABLATION_vpt    := --corpus-ratio 0 --mixup-alpha 0 --desc-loss-weight 0
ABLATION_corpus := --mixup-alpha 0 --desc-loss-weight 0
ABLATION_sfm    := --desc-loss-weight 0
ABLATIONS := lp vpt corpus sfm
.SECONDARY: $(foreach a,$(ABLATIONS),$(RUN)/ablation/$(a)/coarse.pt $(RUN)/ablation/$(a)/results.json)

$(RUN)/ablation/%/coarse.pt: 03_train_coarse.py common.py $(RUN)/text_features.pt $(RUN)/params/train
	$(LAUNCH) 03_train_coarse.py --features $(RUN)/text_features.pt $(TRAIN_PARAMS) $(ABLATION_$*) --out $@

$(RUN)/ablation/%/results.json: 04_eval_hlc.py common.py $(RUN)/ablation/%/coarse.pt $(RUN)/params/eval
	$(LAUNCH) 04_eval_hlc.py --features $(RUN)/text_features.pt --coarse $(RUN)/ablation/$*/coarse.pt $(EVAL_PARAMS) \
	    --explain 0 --out $@

$(RUN)/tables/table4.md: make_tables.py $(RUN)/results.json $(foreach a,$(ABLATIONS),$(RUN)/ablation/$(a)/results.json)
	$(PY) make_tables.py --run $(RUN) --table 4 > /dev/null

$(RUN)/tables/table%.md: make_tables.py $(RUN)/results.json
	$(PY) make_tables.py --run $(RUN) --table $* > /dev/null

table4 table6 table7: table%: $(RUN)/tables/table%.md ## the paper's Table 4 (ablation), 6 (K sweep), 7 (zero-shot)
	@cat $<

tables: table4 table6 table7 ## all three tables

$(VENV)/.installed: requirements.txt
	python3 -m venv $(VENV)
	$(VENV)/bin/python -m pip install -q -r requirements.txt
	touch $@

BENCH_ARGS ?=
bench: $(SETUP) ## speed figures: train/eval/text throughput, TFLOP/s, MFU, JPEG end-to-end, GPU memory
	$(PY) bench.py --device $(DEVICE) $(BENCH_ARGS)

setup: $(SETUP) ## create the virtual environment (make all and make test do this themselves)

test: $(SETUP) ## every test, the slow toy-world run included
	$(PY) -m pytest -q tests

test-fast: $(SETUP) ## the tests without the slow toy-world run
	$(PY) -m pytest -q -m "not slow" tests

clean: ## remove this dataset's run directory
	rm -rf $(RUN)

clean-toy: ## remove the generated toy world
	rm -rf data/toy runs/toy

help: ## this list
	@grep -E '^[a-z0-9 -]+:.*## ' $(MAKEFILE_LIST) | sed -E 's/:.*## /\t/' | expand -t 12
	@echo; echo "Variables: DATASET=$(DATASET) DATA_ROOT=$(DATA_ROOT) RUN=$(RUN) MODEL=$(MODEL) PRETRAINED=$(PRETRAINED)"
	@echo "           EPOCHS=$(EPOCHS) SEED=$(SEED) DEVICE=$(DEVICE) DESCRIPTORS=$(DESCRIPTORS) WIKI=$(WIKI) PY=$(PY)"
	@echo "           DECODE=$(DECODE) (pil, tensor or device: where images are decoded; make bench compares them)"
	@echo "           FEATURE_CACHE=$(FEATURE_CACHE) (frozen-tower features kept between runs)"
	@echo "           GPUS=$(GPUS) (torchrun processes for stages 03-04) TORCHRUN_ARGS=$(TORCHRUN_ARGS)"
	@echo "           LLM_MODEL=$(LLM_MODEL) (a chat model for the descriptors; key in OPENAI_API_KEY, endpoint in OPENAI_BASE_URL)"
	@echo "           CORPUS_ARGS, FEATURE_ARGS, TRAIN_ARGS, EVAL_ARGS, BENCH_ARGS pass any other flag to a script"
