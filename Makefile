# HLC reproducibility kit. `make help` lists the targets; `make -n all DATASET=imagenet_lt` previews a chain
# (a preview, like `make -q`, writes nothing).
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
CUPL        ?=
LLM_MODEL   ?=
CORPUS_ARGS ?=
FEATURE_ARGS ?=
TRAIN_ARGS  ?=
EVAL_ARGS   ?=
RESUME      ?=

# an API key never goes on a command line: ps, make's echo and the params files would all show it
ifneq ($(filter --llm-key --llm-key=%,$(CORPUS_ARGS)),)
$(error CORPUS_ARGS holds --llm-key, which would put the key in ps, in make's output and in $(RUN)/params. Put the key \
  in OPENAI_API_KEY, or in a file: CORPUS_ARGS="--llm-key-file PATH")
endif

# ---- GPUS=N runs stages 03 and 04 under torchrun, one process per GPU (TORCHRUN_ARGS for several nodes) ----
GPUS ?=
TORCHRUN_ARGS ?=
LAUNCH = $(if $(GPUS),$(PY) -m torch.distributed.run --nproc_per_node=$(GPUS) $(or $(TORCHRUN_ARGS),--standalone),$(PY))

# ---- python: a virtual environment from requirements.txt, unless PY points at your own interpreter ----
VENV := .venv
PY   ?= $(VENV)/bin/python
SETUP := $(if $(filter $(VENV)/bin/python,$(PY)),$(VENV)/.installed)

# ---- the data each stage reads, as prerequisites: split files, class-name files, Wikipedia and descriptor files,
#      the model config and weights when they are files, and the folders holding the listed images (a deleted or
#      added image changes its folder's time; stat-ing every image would be too slow on a benchmark) ----
SPLITS_imagenet_lt := ImageNet_LT_train.txt ImageNet_LT_val.txt ImageNet_LT_test.txt
SPLITS_places_lt   := Places_LT_train.txt Places_LT_val.txt Places_LT_test.txt
SPLITS_inat2018    := iNaturalist18_train.txt iNaturalist18_val.txt train2018.json val2018.json
SPLIT_FILES := $(wildcard $(addprefix $(DATA_ROOT)/,$(or $(SPLITS_$(DATASET)),train.txt val.txt test.txt)))
NAME_FILES  := $(wildcard $(addprefix $(DATA_ROOT)/,classnames.txt categories_places365.txt categories.json))
MODEL_FILES := $(wildcard $(MODEL) $(PRETRAINED))
TEXT_FILES  := $(wildcard $(DESCRIPTORS) $(CUPL) $(if $(WIKI),$(WIKI)/desc_*.txt))
DATA_GOALS  := $(filter-out help test test-fast setup clean clean-toy bench bench-scale,$(or $(MAKECMDGOALS),all))
IMAGE_DIRS  := $(if $(DATA_GOALS),$(wildcard $(addprefix $(DATA_ROOT)/,$(shell awk '{sub(/[ \t]+[^ \t]+[ \t]*$$/,""); \
               sub(/\/[^\/]*$$/,""); if (!seen[$$0]++) print}' $(filter %.txt,$(SPLIT_FILES)) /dev/null))))
IMAGE_DATA  := $(SPLIT_FILES) $(NAME_FILES) $(MODEL_FILES) $(IMAGE_DIRS)

# ---- the arguments each output was made with are recorded in $(RUN)/params/<name> when its stage succeeds; an output
#      whose recorded arguments differ from this call's is made again. Nothing is written while make reads this file
#      (`make -n` and `make -q` write nothing), and a stage that fails records nothing, so after a typo in a path or
#      flag is fixed, the next make has nothing to redo ----
CORPUS_PARAMS  := --dataset $(DATASET) --data-root $(DATA_ROOT) --seed $(SEED) \
                  $(if $(WIKI),--wiki $(WIKI)) $(if $(DESCRIPTORS),--descriptors $(DESCRIPTORS)) \
                  $(if $(CUPL),--cupl $(CUPL)) $(if $(LLM_MODEL),--llm-model $(LLM_MODEL)) $(CORPUS_ARGS)
FEATURE_PARAMS := --model $(MODEL) --pretrained $(PRETRAINED) --device $(DEVICE) $(FEATURE_ARGS)
TRAIN_PARAMS   := --dataset $(DATASET) --data-root $(DATA_ROOT) --model $(MODEL) --pretrained $(PRETRAINED) \
                  --epochs $(EPOCHS) --seed $(SEED) --device $(DEVICE) --decode $(DECODE) \
                  --feature-cache $(FEATURE_CACHE) $(TRAIN_ARGS)
EVAL_PARAMS    := --dataset $(DATASET) --data-root $(DATA_ROOT) --model $(MODEL) --pretrained $(PRETRAINED) \
                  --device $(DEVICE) --seed $(SEED) --decode $(DECODE) --feature-cache $(FEATURE_CACHE) $(EVAL_ARGS)

same = $(and $(findstring x$(1)x,x$(2)x),$(findstring x$(2)x,x$(1)x))
# $(1): the params file's name (one per output), $(2): the arguments, $(3): the output they make
params_rule = $(eval $(3): $(if $(call same,$(strip $(2)),$(strip $(file <$(RUN)/params/$(1)))),,FORCE))
record = @{ mkdir -p $(RUN)/params && printf '%s\n' '$(subst ','\'',$(strip $(2)))' > $(RUN)/params/$(1); } || \
         echo "could not record $(RUN)/params/$(1): make will run this stage again" >&2
$(call params_rule,corpus,$(CORPUS_PARAMS),$(RUN)/corpus.json)
$(call params_rule,features,$(FEATURE_PARAMS),$(RUN)/text_features.pt)
FORCE:

.PHONY: all corpus features train eval test test-fast setup help clean clean-toy toy table4 table6 table7 tables \
        bench bench-scale system compare table1 table2 table3 FORCE

all: $(RUN)/results.json ## the whole chain: corpus -> text features -> training -> evaluation
	@cat $(RUN)/results.md

corpus: $(RUN)/corpus.json ## stage 01: class names, text corpus, descriptors
features: $(RUN)/text_features.pt ## stage 02: cached CLIP text features
train: $(RUN)/coarse.pt ## stage 03: prompts, classifier, descriptor weights (RESUME=1 continues last.pt)
eval: $(RUN)/results.json ## stage 04: variants, K and tau sweeps, predictions, explanations
toy: $(DATA_ROOT)/.complete ## stage 00: build the toy world (DATASET=toy only)

$(DATA_ROOT)/.complete: 00_make_toy.py common.py $(SETUP)
	$(PY) 00_make_toy.py --out $(DATA_ROOT) --seed $(SEED)

ifeq ($(DATASET),toy)
$(DESCRIPTORS): $(TOY_DATA) ;
endif

$(RUN)/corpus.json: 01_build_corpus.py llm.py common.py $(NAME_FILES) $(TEXT_FILES) $(TOY_DATA) \
                    $(SETUP)
	$(PY) 01_build_corpus.py $(CORPUS_PARAMS) --out $@
	$(call record,corpus,$(CORPUS_PARAMS))

$(RUN)/text_features.pt: 02_cache_descriptors.py common.py $(RUN)/corpus.json $(MODEL_FILES)
	$(PY) 02_cache_descriptors.py --corpus $(RUN)/corpus.json $(FEATURE_PARAMS) --out $@
	$(call record,features,$(FEATURE_PARAMS))

$(RUN)/coarse.pt: 03_train_coarse.py common.py $(RUN)/text_features.pt $(IMAGE_DATA)
	$(LAUNCH) 03_train_coarse.py --features $(RUN)/text_features.pt $(TRAIN_PARAMS) $(if $(RESUME),--resume) --out $@
	$(call record,train,$(TRAIN_PARAMS))

$(RUN)/results.json: 04_eval_hlc.py common.py $(RUN)/coarse.pt $(RUN)/text_features.pt $(IMAGE_DATA)
	$(LAUNCH) 04_eval_hlc.py --features $(RUN)/text_features.pt --coarse $(RUN)/coarse.pt $(EVAL_PARAMS) --out $@
	$(call record,eval,$(EVAL_PARAMS))

# ---- the paper's tables. Table 4: one training per ablation row, each in its own run directory
#      $(RUN)/ablation/<row>/ with the switches below (recorded in its meta); the full model is $(RUN) itself.
#      ce: the full model with the paper's descriptor loss (plain cross-entropy; the kit's default is logit-adjusted) ----
ABLATION_lp     := --prompt-tokens 0 --corpus-ratio 0 --mixup-alpha 0 --desc-loss-weight 0
ABLATION_vpt    := --corpus-ratio 0 --mixup-alpha 0 --desc-loss-weight 0
ABLATION_corpus := --mixup-alpha 0 --desc-loss-weight 0
ABLATION_sfm    := --desc-loss-weight 0
ABLATION_ce     := --desc-loss-la 0
ABLATIONS := lp vpt corpus sfm ce
.SECONDARY: $(foreach a,$(ABLATIONS),$(RUN)/ablation/$(a)/coarse.pt $(RUN)/ablation/$(a)/results.json)
$(call params_rule,train,$(TRAIN_PARAMS),$(RUN)/coarse.pt)
$(call params_rule,eval,$(EVAL_PARAMS),$(RUN)/results.json)
$(foreach a,$(ABLATIONS),$(call params_rule,ablation-$(a)-train,$(TRAIN_PARAMS) $(ABLATION_$(a)),$(RUN)/ablation/$(a)/coarse.pt))
$(foreach a,$(ABLATIONS),$(call params_rule,ablation-$(a)-eval,$(EVAL_PARAMS),$(RUN)/ablation/$(a)/results.json))

$(RUN)/ablation/%/coarse.pt: 03_train_coarse.py common.py $(RUN)/text_features.pt $(IMAGE_DATA)
	$(LAUNCH) 03_train_coarse.py --features $(RUN)/text_features.pt $(TRAIN_PARAMS) $(ABLATION_$*) \
	    $(if $(RESUME),--resume) --out $@
	$(call record,ablation-$*-train,$(TRAIN_PARAMS) $(ABLATION_$*))

$(RUN)/ablation/%/results.json: 04_eval_hlc.py common.py $(RUN)/ablation/%/coarse.pt $(RUN)/text_features.pt $(IMAGE_DATA)
	$(LAUNCH) 04_eval_hlc.py --features $(RUN)/text_features.pt --coarse $(RUN)/ablation/$*/coarse.pt $(EVAL_PARAMS) \
	    --explain 0 --out $@
	$(call record,ablation-$*-eval,$(EVAL_PARAMS))

$(RUN)/tables/table4.md: make_tables.py $(RUN)/results.json $(foreach a,$(ABLATIONS),$(RUN)/ablation/$(a)/results.json)
	$(PY) make_tables.py --run $(RUN) --table 4 > /dev/null

$(RUN)/tables/table%.md: make_tables.py $(RUN)/results.json
	$(PY) make_tables.py --run $(RUN) --table $* > /dev/null

table4 table6 table7: table%: $(RUN)/tables/table%.md ## the paper's Table 4 (ablation), 6 (K, tau), 7 (zero-shot)
	@cat $<

tables: table4 table6 table7 ## Tables 4, 6 and 7 (table1-3 also run every compared system)

# ---- the compared systems (systems/<name>.py, SYSTEMS.md), each in $(RUN)/systems/<name>/ with its own params file.
#      Each runs its own schedule; EPOCHS=N on the command line sets every phase to N epochs; SYSTEM_ARGS passes any
#      other flag. The toy world gets short schedules of its own (below). One process each: GPUS is for stages 03-04 ----
SYSTEMS := $(sort $(filter-out __init__,$(patsubst systems/%.py,%,$(wildcard systems/*.py))))
NAME ?=
SYSTEM_ARGS ?=
SYSTEM_EPOCHS := $(if $(filter command line environment override,$(origin EPOCHS)),--epochs $(EPOCHS))
ifeq ($(DATASET),toy)
TOY_SYSTEM_ballad        := --epochs-a 10 --epochs-b 10 --batch-size 32 --lr-a 1e-4 --workers 2
TOY_SYSTEM_imbalance_vlm := --epochs 10 --batch-size 32 --workers 2
TOY_SYSTEM_vl_ltr        := --epochs-cvlp 10 --epochs-lgr 10 --batch-size 32 --lr 5e-3 --workers 2
TOY_SYSTEM_lt_dpt        := --epochs 10 --drw-epochs 3 --batch-size 32 --workers 2
endif
system_params = --dataset $(DATASET) --data-root $(DATA_ROOT) --model $(MODEL) --pretrained $(PRETRAINED) --seed $(SEED) \
                --device $(DEVICE) $(TOY_SYSTEM_$(1)) $(SYSTEM_EPOCHS) $(SYSTEM_ARGS)
$(foreach s,$(SYSTEMS),$(call params_rule,system-$(s),$(call system_params,$(s)),$(RUN)/systems/$(s)/results.json))
.SECONDARY: $(foreach s,$(SYSTEMS),$(RUN)/systems/$(s)/results.json)
ifneq ($(filter system,$(MAKECMDGOALS)),)
ifeq ($(filter $(NAME),$(SYSTEMS)),)
$(error NAME=$(NAME) is not a compared system; choose one of: $(SYSTEMS))
endif
endif

$(RUN)/systems/%/results.json: systems/%.py common.py $(RUN)/text_features.pt $(IMAGE_DATA)
	$(PY) -m systems.$* --features $(RUN)/text_features.pt $(call system_params,$*) $(if $(RESUME),--resume) --out $(@D)
	$(call record,system-$*,$(call system_params,$*))

system: $(RUN)/systems/$(NAME)/results.json ## one compared system: make system NAME=ballad (EPOCHS=N, SYSTEM_ARGS=...)
	@cat $(RUN)/systems/$(NAME)/results.md

compare: $(RUN)/results.json $(foreach s,$(SYSTEMS),$(RUN)/systems/$(s)/results.json) ## HLC and every compared system
	@cat $(RUN)/results.md $(foreach s,$(SYSTEMS),$(RUN)/systems/$(s)/results.md)

COMPARISON_INPUTS := make_tables.py $(RUN)/results.json $(RUN)/ablation/lp/results.json $(RUN)/ablation/vpt/results.json \
                     $(foreach s,$(SYSTEMS),$(RUN)/systems/$(s)/results.json)
$(RUN)/tables/table1.md $(RUN)/tables/table2.md $(RUN)/tables/table3.md: $(RUN)/tables/table%.md: $(COMPARISON_INPUTS)
	$(PY) make_tables.py --run $(RUN) --table $* > /dev/null

table1 table2 table3: table%: $(RUN)/tables/table%.md ## the paper's comparisons: Places-LT, ImageNet-LT, iNaturalist
	@cat $<

$(VENV)/.installed: requirements.txt
	python3 -m venv $(VENV)
	$(VENV)/bin/python -m pip install -q -r requirements.txt
	touch $@

BENCH_ARGS ?=
bench: $(SETUP) ## speed figures: train/eval/text throughput, TFLOP/s, MFU, JPEG end-to-end, GPU memory
	$(PY) bench.py --device $(DEVICE) $(BENCH_ARGS)

bench-scale: $(SETUP) ## stage 04 at iNaturalist's size (8,142 classes, 24,426 images): peak memory, file size
	$(PY) bench.py --scale $(BENCH_ARGS)

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
	@echo "           CUPL=$(CUPL) (a CuPL JSON added to the corpus) RESUME=$(RESUME) (1: continue from last.pt)"
	@echo "           DECODE=$(DECODE) (pil, tensor or device: where images are decoded; make bench compares them)"
	@echo "           FEATURE_CACHE=$(FEATURE_CACHE) (frozen-tower features kept between runs)"
	@echo "           GPUS=$(GPUS) (torchrun processes for stages 03-04) TORCHRUN_ARGS=$(TORCHRUN_ARGS)"
	@echo "           LLM_MODEL=$(LLM_MODEL) (a chat model for the descriptors; key in OPENAI_API_KEY, endpoint in OPENAI_BASE_URL)"
	@echo "           NAME=$(NAME) (make system: one of $(SYSTEMS)) SYSTEM_ARGS=$(SYSTEM_ARGS)"
	@echo "           CORPUS_ARGS, FEATURE_ARGS, TRAIN_ARGS, EVAL_ARGS, BENCH_ARGS pass any other flag to a script"
