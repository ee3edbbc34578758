# HLC reproducibility kit. `make help` lists the targets; `make -n all DATASET=imagenet_lt` previews a chain (a preview,
# like `make -q`, writes nothing). docs/make.md explains staleness, locks and the variables.
SHELL := bash
.DELETE_ON_ERROR:
.SUFFIXES:
.DEFAULT_GOAL := all

# $(file <) (GNU make 4.2, 2016) reads the recorded arguments of each output; make 3.81 (macOS) expands it to nothing,
# so every make would redo every stage
ifneq ($(filter 3.% 4.0% 4.1%,$(MAKE_VERSION)),)
$(error this Makefile needs GNU make 4.2 or newer; this is make $(MAKE_VERSION). On macOS: brew install make, then run \
  gmake; or use the conda environment (environment.yml), which brings its own make)
endif

# ---- knobs (override on the command line: make all DATASET=places_lt DATA_ROOT=/data/places365). A method's own
#      settings (learning rate, batch, epochs) are not here: each script holds its recipes per dataset ----
DATASET   ?= toy
SEED      ?= 0
ifeq ($(DATASET),toy)
TOY_NAME  := toy$(if $(filter-out 0,$(SEED)),-seed$(SEED))
DATA_ROOT ?= data/$(TOY_NAME)
RUN       ?= runs/$(TOY_NAME)
MODEL       ?= $(DATA_ROOT)/clip/toy-clip.json
PRETRAINED  ?= $(DATA_ROOT)/clip/toy-clip.pt
DESCRIPTORS ?= $(DATA_ROOT)/descriptors.json
WIKI        ?= $(DATA_ROOT)/wiki
PREPARED    := $(DATA_ROOT)/.complete
# on 2 cores: one loader worker, and the model keeps the other core (common.share_cores)
WORKERS     ?= $(if $(filter 1 2,$(shell getconf _NPROCESSORS_ONLN 2>/dev/null)),1,2)
else ifeq ($(DATASET),cifar100_lt)
IR          ?= 100
CIFAR_ROOT  ?= data/cifar100_lt
DATA_ROOT   ?= $(CIFAR_ROOT)/ir$(IR)
RUN         ?= runs/cifar100_lt-ir$(IR)
PREPARED    := $(DATA_ROOT)/.complete
else
DATA_ROOT ?= data/$(DATASET)
RUN       ?= runs/$(DATASET)
PREPARED  :=
endif
MODEL       ?= ViT-B-16-quickgelu
PRETRAINED  ?= openai
DESCRIPTORS ?= $(wildcard $(DATA_ROOT)/descriptors.json)
WIKI        ?= $(wildcard $(DATA_ROOT)/wiki)
WORKERS     ?= 8
DEVICE      ?= auto
DECODE      ?= pil
FEATURE_CACHE ?= $(RUN)/cache
EPOCHS      ?=
CUPL        ?=
LLM_MODEL   ?=
CORPUS_ARGS ?=
FEATURE_ARGS ?=
TRAIN_ARGS  ?=
EVAL_ARGS   ?=
SYSTEM_ARGS ?=
TOY_ARGS    ?=
RESUME      ?=

# ---- refused at once, before anything runs ----
# an API key never goes on a command line: ps, make's echo and the params files would all show it
ifneq ($(filter --llm-key --llm-key=%,$(CORPUS_ARGS)),)
$(error CORPUS_ARGS holds --llm-key, which would put the key in ps, in make's output and in $(RUN)/params. Put the key \
  in OPENAI_API_KEY, or in a file: CORPUS_ARGS="--llm-key-file PATH")
endif
# make splits every name at spaces: a path with one would become two prerequisites
$(foreach v,DATA_ROOT RUN MODEL PRETRAINED DESCRIPTORS WIKI CUPL FEATURE_CACHE,$(if $(word 2,$($(v))),$(error \
  $(v)="$($(v))" holds a space, which make cannot keep in a file name (it would read two files). Use a path without \
  spaces, e.g. a symbolic link: ln -s "$($(v))" $(v:_ROOT=)_link)))
# weights named as a file must be there before stage 01 runs (the toy world makes its own in stage 00)
ifneq ($(DATASET),toy)
ifneq ($(and $(filter %.pt %.pth %.bin %.safetensors %/%,$(PRETRAINED)),$(if $(wildcard $(PRETRAINED)),,missing)),)
$(error PRETRAINED=$(PRETRAINED): weights file not found)
endif
ifneq ($(and $(filter %.json,$(MODEL)),$(if $(wildcard $(MODEL)),,missing)),)
$(error MODEL=$(MODEL): model config file not found)
endif
endif

# ---- GPUS=N runs stages 03 and 04 under torchrun, one process per GPU (TORCHRUN_ARGS for several nodes) ----
GPUS ?=
TORCHRUN_ARGS ?=
LAUNCH = $(if $(GPUS),$(PY) -m torch.distributed.run --nproc_per_node=$(GPUS) $(or $(TORCHRUN_ARGS),--standalone),$(PY))

# ---- python: a virtual environment from requirements.txt, unless PY points at your own interpreter ----
VENV := .venv
PY   ?= $(VENV)/bin/python
SETUP := $(if $(filter $(VENV)/bin/python,$(PY)),$(VENV)/.installed)

# ---- one make at a time per RUN: the first takes $(RUN)/.make.lock for its whole life (runlock.py), a second is
#      refused at once, as is a RUN holding another dataset's outputs. Previews (-n, -q) take nothing ----
NO_RUN_GOALS := help test test-all setup bench bench-scale clean-toy toy-seeds
MAKE_PID := $(shell echo $$PPID)
ifneq ($(filter-out $(NO_RUN_GOALS),$(or $(MAKECMDGOALS),all)),)
ifeq ($(findstring n,$(firstword -$(MAKEFLAGS)))$(findstring q,$(firstword -$(MAKEFLAGS))),)
RUN_LOCK := $(shell python3 runlock.py $(RUN) $(MAKE_PID) $(DATASET) 2>&1)
ifneq ($(RUN_LOCK),ok)
$(error $(RUN_LOCK))
endif
endif
endif

# ---- the data each stage reads, as prerequisites: its split files, the class-name files, Wikipedia and descriptor
#      files, the model config and weights when they are files, and the folders holding the listed images (a deleted
#      or added image changes its folder's time; stat-ing every image would be too slow on a benchmark). Training
#      depends on the training split only, evaluation on the evaluation split (and the training counts) ----
SPLITS_imagenet_lt := train:ImageNet_LT_train.txt val:ImageNet_LT_val.txt test:ImageNet_LT_test.txt
SPLITS_places_lt   := train:Places_LT_train.txt val:Places_LT_val.txt test:Places_LT_test.txt
SPLITS_inat2018    := train:iNaturalist18_train.txt train:train2018.json test:iNaturalist18_val.txt test:val2018.json
split_files = $(wildcard $(addprefix $(DATA_ROOT)/,$(patsubst $(1):%,%,$(filter $(1):%,$(or $(SPLITS_$(DATASET)),\
              train:train.txt val:val.txt test:test.txt)))))
DATA_GOALS  := $(filter-out $(NO_RUN_GOALS) clean,$(or $(MAKECMDGOALS),all))
# folders of the images a split lists (a folder named with a space is refused: make cannot hold it)
list_dirs  = $(if $(DATA_GOALS),$(shell awk '{sub(/[ \t]+[^ \t]+[ \t]*$$/,""); sub(/\/[^\/]*$$/,""); \
             if (!seen[$$0]++) { if ($$0 ~ / /) { print "SPACE:" FILENAME ":" FNR; exit } print } }' \
             $(filter %.txt,$(1)) /dev/null))
image_dirs = $(foreach d,$(1),$(if $(findstring SPACE:,$(d)),$(error $(subst SPACE:,,$(d)): an image folder whose \
             name holds a space; make cannot track it (it would read two folders). Rename the folder, or run the \
             stages by hand (python 03_train_coarse.py ...), which read such paths)))$(wildcard $(addprefix \
             $(DATA_ROOT)/,$(1)))
TRAIN_SPLIT := $(call split_files,train)
VAL_SPLIT   := $(call split_files,val)
EVAL_SPLIT  := $(call split_files,test)
TRAIN_DIRS  := $(call image_dirs,$(call list_dirs,$(TRAIN_SPLIT)))
EVAL_DIRS   := $(call image_dirs,$(call list_dirs,$(EVAL_SPLIT)))
VAL_DIRS    := $(call image_dirs,$(call list_dirs,$(VAL_SPLIT)))
NAME_FILES  := $(wildcard $(addprefix $(DATA_ROOT)/,classnames.txt categories_places365.txt categories.json))
MODEL_FILES := $(wildcard $(MODEL) $(PRETRAINED))
TEXT_FILES  := $(wildcard $(DESCRIPTORS) $(CUPL) $(if $(WIKI),$(WIKI)/desc_*.txt))
TRAIN_DATA  := $(TRAIN_SPLIT) $(NAME_FILES) $(MODEL_FILES) $(TRAIN_DIRS) $(PREPARED)
EVAL_DATA   := $(TRAIN_SPLIT) $(EVAL_SPLIT) $(NAME_FILES) $(MODEL_FILES) $(EVAL_DIRS) $(PREPARED)
SYSTEM_DATA := $(sort $(TRAIN_DATA) $(EVAL_DATA) $(VAL_SPLIT) $(VAL_DIRS))

# ---- the arguments each output was made with are recorded in $(RUN)/params/<name> when its stage succeeds; an output
#      whose recorded arguments differ from this call's is made again. Nothing is written while make reads this file
#      (`make -n` and `make -q` write nothing), and a stage that fails records nothing, so after a typo in a path or
#      flag is fixed, the next make has nothing to redo ----
EPOCHS_ARG     := $(if $(EPOCHS),--epochs $(EPOCHS))
CORPUS_PARAMS  := --dataset $(DATASET) --data-root $(DATA_ROOT) --seed $(SEED) \
                  $(if $(WIKI),--wiki $(WIKI)) $(if $(DESCRIPTORS),--descriptors $(DESCRIPTORS)) \
                  $(if $(CUPL),--cupl $(CUPL)) $(if $(LLM_MODEL),--llm-model $(LLM_MODEL)) $(CORPUS_ARGS)
FEATURE_PARAMS := --model $(MODEL) --pretrained $(PRETRAINED) --device $(DEVICE) $(FEATURE_ARGS)
RUN_PARAMS     := --dataset $(DATASET) --data-root $(DATA_ROOT) --model $(MODEL) --pretrained $(PRETRAINED) \
                  --seed $(SEED) --device $(DEVICE) --workers $(WORKERS)
TRAIN_PARAMS   := $(RUN_PARAMS) --decode $(DECODE) --feature-cache $(FEATURE_CACHE) $(EPOCHS_ARG) $(TRAIN_ARGS)
EVAL_PARAMS    := $(RUN_PARAMS) --decode $(DECODE) --feature-cache $(FEATURE_CACHE) $(EVAL_ARGS)
SYSTEM_PARAMS  := $(RUN_PARAMS) $(EPOCHS_ARG) $(SYSTEM_ARGS)

same = $(and $(findstring x$(1)x,x$(2)x),$(findstring x$(2)x,x$(1)x))
# $(1): the params file's name (one per output), $(2): the arguments, $(3): the output they make
params_rule = $(eval $(3): $(if $(call same,$(strip $(2)),$(strip $(file <$(RUN)/params/$(1)))),,FORCE))
record = @{ mkdir -p $(RUN)/params && printf '%s\n' '$(subst ','\'',$(strip $(2)))' > $(RUN)/params/$(1); } || \
         echo "could not record $(RUN)/params/$(1): make will run this stage again" >&2
$(call params_rule,corpus,$(CORPUS_PARAMS),$(RUN)/corpus.json)
$(call params_rule,features,$(FEATURE_PARAMS),$(RUN)/text_features.pt)
$(call params_rule,train,$(TRAIN_PARAMS),$(RUN)/coarse.pt)
$(call params_rule,eval,$(EVAL_PARAMS),$(RUN)/results.json)
FORCE:

.PHONY: all corpus features train eval test test-all setup help clean clean-toy toy data table4 table6 \
        table7 tables bench bench-scale system compare table1 table2 table3 tune-toy toy-seeds report FORCE

all: $(RUN)/results.json ## the whole chain: corpus -> text features -> training -> evaluation (+ report.html)
	@cat $(RUN)/results.md

corpus: $(RUN)/corpus.json ## stage 01: class names, text corpus, descriptors
features: $(RUN)/text_features.pt ## stage 02: cached CLIP text features
train: $(RUN)/coarse.pt ## stage 03: prompts, classifier, descriptor weights (RESUME=1 continues last.pt)
eval: $(RUN)/results.json ## stage 04: variants, K and tau sweeps, predictions, explanations, report.html
data: $(PREPARED) ## stage 00: build the toy world (DATASET=toy) or CIFAR-100-LT's files (DATASET=cifar100_lt)
toy: data

DATA_PARAMS := $(if $(filter toy,$(DATASET)),--out $(DATA_ROOT) --seed $(SEED) $(TOY_ARGS),--root $(CIFAR_ROOT) --ir $(IR))
$(if $(PREPARED),$(call params_rule,data,$(DATA_PARAMS),$(PREPARED)))
$(DATA_ROOT)/.complete: $(if $(filter toy,$(DATASET)),00_make_toy.py,00_make_cifar100_lt.py) common.py $(SETUP)
	$(PY) $(if $(filter toy,$(DATASET)),00_make_toy.py,00_make_cifar100_lt.py) $(DATA_PARAMS)
	$(call record,data,$(DATA_PARAMS))

$(RUN)/corpus.json: 01_build_corpus.py llm.py common.py $(NAME_FILES) $(TEXT_FILES) $(PREPARED) $(SETUP)
	$(PY) 01_build_corpus.py $(CORPUS_PARAMS) --out $@
	$(call record,corpus,$(CORPUS_PARAMS))

$(RUN)/text_features.pt: 02_cache_descriptors.py common.py $(RUN)/corpus.json $(MODEL_FILES)
	$(PY) 02_cache_descriptors.py --corpus $(RUN)/corpus.json $(FEATURE_PARAMS) --out $@
	$(call record,features,$(FEATURE_PARAMS))

$(RUN)/coarse.pt: 03_train_coarse.py common.py $(RUN)/text_features.pt $(TRAIN_DATA)
	$(LAUNCH) 03_train_coarse.py --features $(RUN)/text_features.pt $(TRAIN_PARAMS) $(if $(RESUME),--resume) --out $@
	$(call record,train,$(TRAIN_PARAMS))

$(RUN)/results.json: 04_eval_hlc.py common.py $(RUN)/coarse.pt $(RUN)/text_features.pt $(EVAL_DATA)
	$(LAUNCH) 04_eval_hlc.py --features $(RUN)/text_features.pt --coarse $(RUN)/coarse.pt $(EVAL_PARAMS) --out $@
	$(call record,eval,$(EVAL_PARAMS))

# ---- the paper's tables. Table 4: one training per ablation row, each in its own run directory
#      $(RUN)/ablation/<row>/ with the switches below (recorded in its meta); the full model is $(RUN) itself.
#      desc_ce: the full model with a plain cross-entropy descriptor loss (the kit's default is logit-adjusted) ----
ABLATION_lp      := --prompt-tokens 0 --corpus-ratio 0 --mixup-alpha 0 --desc-loss-weight 0
ABLATION_vpt     := --corpus-ratio 0 --mixup-alpha 0 --desc-loss-weight 0
ABLATION_corpus  := --mixup-alpha 0 --desc-loss-weight 0
ABLATION_sfm     := --desc-loss-weight 0
ABLATION_desc_ce := --desc-loss-la 0
ABLATIONS := lp vpt corpus sfm desc_ce
.SECONDARY: $(foreach a,$(ABLATIONS),$(RUN)/ablation/$(a)/coarse.pt $(RUN)/ablation/$(a)/results.json)
$(foreach a,$(ABLATIONS),$(call params_rule,ablation-$(a)-train,$(TRAIN_PARAMS) $(ABLATION_$(a)),$(RUN)/ablation/$(a)/coarse.pt))
$(foreach a,$(ABLATIONS),$(call params_rule,ablation-$(a)-eval,$(EVAL_PARAMS),$(RUN)/ablation/$(a)/results.json))

$(RUN)/ablation/%/coarse.pt: 03_train_coarse.py common.py $(RUN)/text_features.pt $(TRAIN_DATA)
	$(LAUNCH) 03_train_coarse.py --features $(RUN)/text_features.pt $(TRAIN_PARAMS) $(ABLATION_$*) \
	    $(if $(RESUME),--resume) --out $@
	$(call record,ablation-$*-train,$(TRAIN_PARAMS) $(ABLATION_$*))

$(RUN)/ablation/%/results.json: 04_eval_hlc.py common.py $(RUN)/ablation/%/coarse.pt $(RUN)/text_features.pt $(EVAL_DATA)
	$(LAUNCH) 04_eval_hlc.py --features $(RUN)/text_features.pt --coarse $(RUN)/ablation/$*/coarse.pt $(EVAL_PARAMS) \
	    --explain 0 --no-report --out $@
	$(call record,ablation-$*-eval,$(EVAL_PARAMS))

$(RUN)/tables/table4.md: make_tables.py $(RUN)/results.json $(foreach a,$(ABLATIONS),$(RUN)/ablation/$(a)/results.json)
	$(PY) make_tables.py --run $(RUN) --table 4 > /dev/null

$(RUN)/tables/table%.md: make_tables.py $(RUN)/results.json
	$(PY) make_tables.py --run $(RUN) --table $* > /dev/null

table4 table6 table7: table%: $(RUN)/tables/table%.md ## the paper's Table 4 (ablation), 6 (K, tau), 7 (zero-shot)
	@cat $<
	@$(PY) report.py --run $(RUN) --quiet

tables: table4 table6 table7 ## Tables 4, 6 and 7 (table1-3 also run every compared system)

# ---- the compared systems (systems/<name>.py, docs/systems.md), each in $(RUN)/systems/<name>/ with its own params
#      file. Each runs its own recipe for the dataset (a dict at the top of its script); EPOCHS=N sets every phase to N
#      epochs, SYSTEM_ARGS passes any other flag. One process each: GPUS is for stages 03-04 ----
SYSTEMS := $(sort $(filter-out __init__ frame,$(patsubst systems/%.py,%,$(wildcard systems/*.py))))
NAME ?=
$(foreach s,$(SYSTEMS),$(call params_rule,system-$(s),$(SYSTEM_PARAMS),$(RUN)/systems/$(s)/results.json))
.SECONDARY: $(foreach s,$(SYSTEMS),$(RUN)/systems/$(s)/results.json)
ifneq ($(filter system,$(MAKECMDGOALS)),)
ifeq ($(filter $(NAME),$(SYSTEMS)),)
$(error NAME=$(NAME) is not a compared system; choose one of: $(SYSTEMS))
endif
endif

$(RUN)/systems/%/results.json: systems/%.py systems/frame.py common.py $(RUN)/text_features.pt $(SYSTEM_DATA)
	$(PY) -m systems.$* --features $(RUN)/text_features.pt $(SYSTEM_PARAMS) $(if $(RESUME),--resume) --out $(@D)
	$(call record,system-$*,$(SYSTEM_PARAMS))

system: $(RUN)/systems/$(NAME)/results.json ## one compared system: make system NAME=ballad (EPOCHS=N, SYSTEM_ARGS=...)
	@cat $(RUN)/systems/$(NAME)/results.md

COMPARISON_INPUTS := make_tables.py $(RUN)/results.json $(RUN)/ablation/lp/results.json $(RUN)/ablation/vpt/results.json \
                     $(foreach s,$(SYSTEMS),$(RUN)/systems/$(s)/results.json)
compare: $(COMPARISON_INPUTS) ## HLC, the linear probe, VPT and every compared system, with steps, lr and parameters
	@$(PY) make_tables.py --run $(RUN) --table compare
	@$(PY) report.py --run $(RUN) --quiet

$(RUN)/tables/table1.md $(RUN)/tables/table2.md $(RUN)/tables/table3.md: $(RUN)/tables/table%.md: $(COMPARISON_INPUTS)
	$(PY) make_tables.py --run $(RUN) --table $* > /dev/null

table1 table2 table3: table%: $(RUN)/tables/table%.md ## the paper's comparisons: Places-LT, ImageNet-LT, iNaturalist
	@cat $<
	@$(PY) report.py --run $(RUN) --quiet

report: $(RUN)/results.json ## rewrite $(RUN)/report.html from whatever results the run holds
	$(PY) report.py --run $(RUN)

# ---- the toy comparison's learning rates, picked on the val split from one shared grid (docs/systems.md) ----
tune-toy: $(RUN)/text_features.pt ## every method at its original lr x 1, 3, 10, 30 on the toy's val split
	$(PY) tune_toy.py --run $(RUN) --features $(RUN)/text_features.pt $(RUN_PARAMS) $(TUNE_ARGS)

toy-seeds: ## make tables and make compare for SEED=0, 1, 2, then their mean and spread (runs/toy-seeds.md)
	$(foreach s,0 1 2,$(MAKE) tables compare DATASET=toy SEED=$(s) PY=$(PY) &&) true
	$(PY) make_tables.py --seeds runs/toy runs/toy-seed1 runs/toy-seed2 --out runs/toy-seeds.md

$(VENV)/.installed: requirements.txt
	python3 -m venv $(VENV)
	$(VENV)/bin/python -m pip install -q -r requirements.txt
	touch $@

BENCH_ARGS ?=
bench: $(SETUP) ## speed figures: train/eval/text throughput, TFLOP/s, MFU, JPEG end-to-end, GPU memory
	$(PY) bench.py --device $(DEVICE) $(BENCH_ARGS)

bench-scale: $(SETUP) ## stages 01-04 on a synthetic world of iNaturalist's size: time and peak memory per stage
	$(PY) bench.py --scale $(BENCH_ARGS)

setup: $(SETUP) ## create the virtual environment (make all and make test do this themselves)

test: $(SETUP) ## the tests that cover every path once (under 8 minutes on 2 cores)
	$(PY) -m pytest -q -m "not slow" --durations=15 tests

test-all: $(SETUP) ## every test, the toy world end to end and the slow checks too (what CI runs)
	$(PY) -m pytest -q --durations=15 tests

clean: ## remove this run directory
	rm -rf $(RUN)

clean-toy: ## remove every generated toy world and its runs
	rm -rf data/toy data/toy-seed* runs/toy runs/toy-seed* runs/toy-seeds.md

help: ## this list
	@grep -E '^[a-z0-9 -]+:.*## ' $(MAKEFILE_LIST) | sed -E 's/:.*## /\t/' | expand -t 12
	@echo; echo "Variables: DATASET=$(DATASET) DATA_ROOT=$(DATA_ROOT) RUN=$(RUN) MODEL=$(MODEL) PRETRAINED=$(PRETRAINED)"
	@echo "           SEED=$(SEED) EPOCHS=$(EPOCHS) (empty: each script's recipe) DEVICE=$(DEVICE) WORKERS=$(WORKERS)"
	@echo "           DESCRIPTORS=$(DESCRIPTORS) WIKI=$(WIKI) CUPL=$(CUPL) PY=$(PY)"
	@echo "           RESUME=$(RESUME) (1: continue from last.pt) DECODE=$(DECODE) (pil, tensor or device)"
	@echo "           FEATURE_CACHE=$(FEATURE_CACHE) (frozen-tower features kept between runs)"
	@echo "           GPUS=$(GPUS) (torchrun processes for stages 03-04) TORCHRUN_ARGS=$(TORCHRUN_ARGS)"
	@echo "           LLM_MODEL=$(LLM_MODEL) (a chat model for the descriptors; key in OPENAI_API_KEY, endpoint in OPENAI_BASE_URL)"
	@echo "           NAME=$(NAME) (make system: one of $(SYSTEMS)) IR=$(IR) (cifar100_lt: 100, 50 or 10)"
	@echo "           CORPUS_ARGS, FEATURE_ARGS, TRAIN_ARGS, EVAL_ARGS, SYSTEM_ARGS, BENCH_ARGS, TUNE_ARGS: any other flag"
