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
# make splits file names at spaces, and every path the kit builds starts with its own folder's
ifneq ($(word 2,$(CURDIR)),)
$(error the kit's folder "$(CURDIR)" holds a space, which make cannot keep in a file name. Clone or move the kit to \
  a path without spaces (a symbolic link does not do: make works in the real folder))
endif

# a variable typed wrong (EPOCH=1, DATSET=..., gpus=4) would be taken silently and the run go on with the default:
# one given on the command line that the Makefile never reads, and close to one it does, is refused naming both
# (others, such as CUDA_VISIBLE_DEVICES=1, pass on to the stages' environment as make passes them)
MAKEFILE_TEXT := $(file <$(firstword $(MAKEFILE_LIST)))
UNREAD := $(foreach v,$(.VARIABLES),$(if $(filter command line,$(origin $(v))),$(if $(findstring \
            $$($(v)),$(MAKEFILE_TEXT)),,$(v))))
ifneq ($(UNREAD),)
MISTYPED := $(shell python3 -c 'import difflib, re, sys; known = set(re.findall(r"\$$\(([A-Z_]+)\)", \
  open(sys.argv[1]).read())); print(" ".join(f"{v}:{m[0]}" for v in sys.argv[2:] \
  for m in [difflib.get_close_matches(v.upper(), known, 1, 0.8)] if m))' $(firstword $(MAKEFILE_LIST)) $(UNREAD))
ifneq ($(MISTYPED),)
$(error $(foreach m,$(MISTYPED),$(word 1,$(subst :, ,$(m)))=$($(word 1,$(subst :, ,$(m)))) is not a variable of \
  the kit, did you mean $(word 2,$(subst :, ,$(m)))?) (make help lists them))
endif
endif

# ---- knobs (override on the command line: make all DATASET=places_lt DATA_ROOT=/data/places365). A method's own
#      settings (learning rate, batch, epochs) are not here: each script holds its recipes per dataset ----
DATASET   ?= toy
SEED      ?= 0
# a path is one folder however it is spelt: a trailing slash and a leading ./ are dropped before anything uses it
tidy = $(patsubst ./%,%,$(patsubst %/,%,$(1)))
given = $(filter command% environment%,$(origin $(1)))
# what is left of a value once its digits are taken out: empty for a whole number (and for an empty value)
digitless = $(subst 9,,$(subst 8,,$(subst 7,,$(subst 6,,$(subst 5,,$(subst 4,,$(subst 3,,$(subst 2,,$(subst 1,,$(subst \
            0,,$(1)))))))))))
# (a link into a folder whose real path holds a space, the way round a space, is compared as the link itself)
canon = $(if $(word 2,$(realpath $(1))),$(abspath $(1)),$(or $(realpath $(1)),$(abspath $(1))))
RUN_GIVEN := $(call given,RUN)
DATA_ROOT_GIVEN := $(call given,DATA_ROOT)
ifneq ($(origin DATA_ROOT),undefined)
override DATA_ROOT := $(call tidy,$(DATA_ROOT))
endif
ifneq ($(origin RUN),undefined)
override RUN := $(call tidy,$(RUN))
endif
ifeq ($(DATASET),toy)
TOY_NAME  := toy$(if $(filter-out 0,$(SEED)),-seed$(SEED))
DATA_ROOT ?= data/$(TOY_NAME)
RUN       ?= runs/$(TOY_NAME)
MODEL       ?= $(DATA_ROOT)/clip/toy-clip.json
PRETRAINED  ?= $(DATA_ROOT)/clip/toy-clip.safetensors
DESCRIPTORS ?= $(DATA_ROOT)/descriptors.json
WIKI        ?= $(DATA_ROOT)/wiki
PREPARED    := $(DATA_ROOT)/.complete
# on 2 cores: one loader worker, and the model keeps the other core (common.share_cores)
WORKERS     ?= $(if $(filter 1 2,$(shell getconf _NPROCESSORS_ONLN 2>/dev/null)),1,2)
# stage 00 builds a toy world only in a folder it made (common.KIT_MARKER) or an empty one: DATASET left at its default
# with DATA_ROOT naming a dataset would otherwise be read as a toy world
ifneq ($(wildcard $(DATA_ROOT)/*),)
ifeq ($(wildcard $(DATA_ROOT)/.made-by-hlc-kit)$(wildcard $(DATA_ROOT)/clip/toy-clip.json),)
$(error DATA_ROOT=$(DATA_ROOT) holds files but no toy world, and DATASET is toy (the default). For your own dataset \
  set DATASET: imagenet_lt, places_lt, inat2018, cifar100_lt, or any name for the generic layout (train.txt, test.txt, \
  classnames.txt); for a toy world give an empty or new DATA_ROOT)
endif
endif
else ifeq ($(DATASET),cifar100_lt)
# CIFAR-100-LT is made from torchvision's cifar-100-python/: CIFAR_ROOT names the folder holding it (or to receive the
# download), or that folder itself; the long-tailed splits go to CIFAR_ROOT/irIR, which is DATA_ROOT. DATA_ROOT given
# alone, as for the other datasets, is read as one of them: an irN folder is the splits' (its parent CIFAR_ROOT, IR read
# from its name), a folder of another name holding train.txt and no cifar-100-python/ holds splits made before, any
# other folder is CIFAR_ROOT
CIFAR_ROOT_GIVEN := $(call given,CIFAR_ROOT)
ifneq ($(and $(DATA_ROOT_GIVEN),$(if $(CIFAR_ROOT_GIVEN),,yes)),)
ROOT_IR := $(patsubst ir%,%,$(filter ir%,$(notdir $(DATA_ROOT))))
ifneq ($(and $(ROOT_IR),$(if $(call digitless,$(ROOT_IR)),,yes)),)
ifneq ($(and $(call given,IR),$(filter-out $(ROOT_IR),$(IR))),)
$(error DATA_ROOT=$(DATA_ROOT) is where the splits of IR $(ROOT_IR) go, but IR=$(IR). Pass IR=$(ROOT_IR), or the \
  folder holding cifar-100-python as DATA_ROOT (its ir$(IR) is made there))
endif
IR          := $(ROOT_IR)
CIFAR_ROOT  := $(call tidy,$(dir $(DATA_ROOT)))
else ifeq ($(if $(wildcard $(DATA_ROOT)/train.txt),$(if $(wildcard $(DATA_ROOT)/cifar-100-python),,made)),made)
# splits made before, in a folder of another name: read as they are, stage 00 not run (IR names the RUN only)
SPLITS_MADE := yes
ROOT_IR := $(shell sed -n 's/.*"ir": *\([0-9][0-9]*\).*/\1/p' $(DATA_ROOT)/.complete 2>/dev/null)
ifneq ($(and $(ROOT_IR),$(call given,IR),$(filter-out $(ROOT_IR),$(IR))),)
$(error DATA_ROOT=$(DATA_ROOT) holds the splits of IR $(ROOT_IR) ($(DATA_ROOT)/.complete), but IR=$(IR). Pass \
  IR=$(ROOT_IR), or leave IR out)
endif
IR          ?= $(or $(ROOT_IR),100)
else
CIFAR_ROOT  := $(DATA_ROOT)
endif
endif
IR          ?= 100
ifneq ($(or $(call digitless,$(IR)),$(if $(subst 0,,$(IR)),,zero)),)
$(error IR=$(IR): CIFAR-100-LT's imbalance ratio is a whole number from 1 (LIFT: 100, 50, 10))
endif
ifneq ($(filter 0%,$(IR)),)
$(error IR=$(IR): write it without leading zeros; the splits' folder is named as it is written (ir$(IR)), so IR=0100 \
  and IR=100 would be two copies of one ratio)
endif
CIFAR_ROOT  ?= data/cifar100_lt
override CIFAR_ROOT := $(call tidy,$(CIFAR_ROOT))
ifeq ($(notdir $(CIFAR_ROOT)),cifar-100-python)
override CIFAR_ROOT := $(call tidy,$(dir $(CIFAR_ROOT)))
endif
ifneq ($(and $(DATA_ROOT_GIVEN),$(CIFAR_ROOT_GIVEN)),)
ifneq ($(abspath $(DATA_ROOT)),$(abspath $(CIFAR_ROOT)/ir$(IR)))
$(error DATA_ROOT=$(DATA_ROOT) and CIFAR_ROOT=$(CIFAR_ROOT) disagree: stage 00 writes the splits of IR $(IR) to \
  $(CIFAR_ROOT)/ir$(IR). Give one of the two)
endif
endif
ifeq ($(SPLITS_MADE),)
override DATA_ROOT := $(CIFAR_ROOT)/ir$(IR)
PREPARED    := $(DATA_ROOT)/.complete
else
PREPARED    :=
endif
RUN         ?= runs/cifar100_lt-ir$(IR)
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
FRESH       ?=
SPLIT       ?=
SHOT_RULE   ?=

# ---- refused at once, before anything runs ----
# the evaluation split and the shot rule are Make variables, so that HLC, its ablations and every compared system are
# scored alike: one table never mixes rows of two splits
ifneq ($(filter --split --split=% --shot-rule --shot-rule=%,$(EVAL_ARGS) $(SYSTEM_ARGS)),)
$(error EVAL_ARGS or SYSTEM_ARGS sets --split or --shot-rule: use SPLIT=... and SHOT_RULE=..., which reach stage 04, \
  the ablation rows and the compared systems alike)
endif
# a run writes into RUN and `make clean` removes all of it: it never holds the dataset
ifneq ($(filter $(call canon,$(RUN)) $(call canon,$(RUN))/%,$(call canon,$(DATA_ROOT))),)
$(error RUN=$(RUN) is DATA_ROOT=$(DATA_ROOT) or holds it: the run's files would sit among the dataset's, and make \
  clean would remove the dataset with them. Give the run a folder of its own, e.g. RUN=runs/$(DATASET))
endif
ifneq ($(filter-out train val test,$(SPLIT)),)
$(error SPLIT=$(SPLIT): the evaluation split is train, val or test (empty: test, or val for iNaturalist; docs/make.md))
endif
ifneq ($(filter-out lift vl-ltr,$(SHOT_RULE)),)
$(error SHOT_RULE=$(SHOT_RULE): the shot rule is lift (LIFT's, the default) or vl-ltr)
endif
ifneq ($(filter-out pil tensor device,$(DECODE)),)
$(error DECODE=$(DECODE): images are decoded by pil (the default), tensor or device (docs/speed.md))
endif
ifneq ($(or $(call digitless,$(SEED)),$(if $(SEED),$(shell [ $(SEED) -le 4294967295 ] 2>/dev/null || echo big),empty)),)
$(error SEED=$(SEED): the seed of every stage is a whole number from 0 to 4294967295)
endif
ifneq ($(filter 0%,$(filter-out 0,$(SEED))),)
$(error SEED=$(SEED): write the seed without leading zeros; the toy world's and the runs' folders are named as it \
  is written, so SEED=07 and SEED=7 would be two runs of one seed)
endif
ifneq ($(if $(GPUS),$(or $(call digitless,$(GPUS)),$(if $(subst 0,,$(GPUS)),,zero))),)
$(error GPUS=$(GPUS): the number of torchrun processes for stages 03-04, one per GPU, is a whole number from 1; leave \
  GPUS out to run them as one process)
endif
ifneq ($(if $(EPOCHS),$(or $(call digitless,$(EPOCHS)),$(if $(subst 0,,$(EPOCHS)),,zero))),)
$(error EPOCHS=$(EPOCHS): every script's epochs is a whole number from 1; leave EPOCHS out for each script's recipe)
endif
ifneq ($(filter 0%,$(EPOCHS)),)
$(error EPOCHS=$(EPOCHS): write it without leading zeros; the runs record it as written, so EPOCHS=010 would train \
  again what EPOCHS=10 trained)
endif
ifneq ($(or $(call digitless,$(WORKERS)),$(if $(WORKERS),,empty)),)
$(error WORKERS=$(WORKERS): the number of image-loading processes is a whole number (0: load in the main process))
endif
# a device's kind: cuda:N is cuda when N is a number (torch's mps passes too, untried); whether this machine has it
# is the first stage's to say
device_name = $(if $(filter cuda:%,$(1)),$(if $(call digitless,$(1:cuda:%=%)),,$(if $(1:cuda:%=%),cuda)),$(1))
ifneq ($(or $(word 2,$(DEVICE)),$(if $(filter auto cpu mps cuda,$(call device_name,$(DEVICE))),,bad)),)
$(error DEVICE=$(DEVICE): not a device name; use auto (a GPU when there is one), cpu, cuda or cuda:N)
endif
ifneq ($(and $(RESUME),$(FRESH)),)
$(error RESUME=1 continues an interrupted training, FRESH=1 starts it over: give one of them)
endif
# an API key never goes on a command line: ps, make's echo and the params files would all show it
ifneq ($(filter --llm-key --llm-key=%,$(CORPUS_ARGS)),)
$(error CORPUS_ARGS holds --llm-key, which would put the key in ps, in make's output and in $(RUN)/params. Put the key \
  in OPENAI_API_KEY, or in a file: CORPUS_ARGS="--llm-key-file PATH")
endif
# make splits every name at spaces: a path with one would become two prerequisites
$(foreach v,DATA_ROOT RUN MODEL PRETRAINED DESCRIPTORS WIKI CUPL FEATURE_CACHE,$(if $(word 2,$($(v))),$(error \
  $(v)="$($(v))" holds a space, which make cannot keep in a file name (it would read two files). Use a path without \
  spaces, e.g. a symbolic link: ln -s "$($(v))" $(v:_ROOT=)_link)))
# a RUN that is a file: every goal, make clean too, stops here, before anything is read from it or removed
ifneq ($(and $(wildcard $(RUN)),$(if $(wildcard $(RUN)/.),,file)),)
$(error RUN=$(RUN) is a file, not a run folder: name a folder with RUN=)
endif
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
VENV_PYTHON ?= python3
SETUP := $(if $(filter $(VENV)/bin/python,$(PY)),$(VENV)/.installed)
# your own interpreter (PY=python): the packages the stages import are looked for (not imported: 50 ms) before any
# stage runs, so a conda environment not activated is one line here, not a traceback from the first stage
ifeq ($(SETUP),)
ifneq ($(filter-out help clean clean-toy setup,$(or $(MAKECMDGOALS),all)),)
PY_MISSING := $(shell $(PY) -c "import importlib.util as u; print(', '.join(m for m in ('numpy', 'PIL', 'torch', \
  'torchvision', 'open_clip', 'tqdm') if u.find_spec(m) is None))" 2>/dev/null || echo -)
ifneq ($(PY_MISSING),)
$(error PY=$(PY) $(if $(filter -,$(PY_MISSING)),could not be run,has no $(PY_MISSING)): install requirements.txt \
  into that environment (pip install -r requirements.txt), or leave PY out and make builds .venv from it)
endif
endif
endif

# ---- make report (alone) redraws a run's page from the results it holds: a RUN with no results.json, a typo in RUN
#      or a run not made yet, is named with the runs beside it, not made from scratch (hours on a benchmark) ----
REPORT_ONLY := $(if $(filter-out report,$(MAKECMDGOALS)),,$(filter report,$(MAKECMDGOALS)))
ifneq ($(REPORT_ONLY),)
ifeq ($(wildcard $(RUN)/results.json),)
RUNS_MADE := $(patsubst %/results.json,%,$(wildcard $(dir $(RUN:%/=%))*/results.json))
RUN_GUESS := $(shell python3 -c 'import difflib, os, sys; name = os.path.basename; runs = {name(r): r for r in \
  sys.argv[2:]}; print(*(runs[m] for m in difflib.get_close_matches(name(sys.argv[1]), runs, 1, 0.6)))' \
  '$(RUN:%/=%)' $(RUNS_MADE) 2>/dev/null)
$(error RUN=$(RUN) holds no results.json, so there is no report to redraw$(if $(RUN_GUESS), (did you mean \
  RUN=$(RUN_GUESS)?)). make all RUN=$(RUN:%/=%) makes a run and its report$(if $(RUNS_MADE),; runs with results \
  here: $(wordlist 1,5,$(RUNS_MADE))))
endif
endif

# ---- one make at a time per RUN: the first takes $(RUN)/.make.lock for its whole life (runlock.py), a second is
#      refused at once, as is a RUN holding another dataset's outputs (but for make report, which reads only the
#      run). Previews (-n, -q) take nothing ----
NO_RUN_GOALS := help test test-all setup bench bench-scale clean clean-toy toy-seeds toy-clip
MAKE_PID := $(shell echo $$PPID)
ifneq ($(filter-out $(NO_RUN_GOALS),$(or $(MAKECMDGOALS),all)),)
ifeq ($(findstring n,$(firstword -$(MAKEFLAGS)))$(findstring q,$(firstword -$(MAKEFLAGS))),)
RUN_LOCK := $(shell python3 runlock.py $(RUN) $(MAKE_PID) $(if $(REPORT_ONLY),-,$(DATASET)) 2>&1)
ifneq ($(RUN_LOCK),ok)
$(error $(RUN_LOCK))
endif
endif
endif

# ---- the data each stage reads. Prerequisites: its split files, the class-name files, Wikipedia and descriptor files,
#      the model config and weights when they are files. The images a split lists are stamped (datastamp.py: every
#      listed image's path, size and modification time) and the stamp is recorded with the stage's settings below, so
#      an image added, removed or replaced in place runs the stages that read that split again. Training depends on
#      the training split only, evaluation on the evaluation split (and the training counts) ----
SPLITS_imagenet_lt := train:ImageNet_LT_train.txt val:ImageNet_LT_val.txt test:ImageNet_LT_test.txt
SPLITS_places_lt   := train:Places_LT_train.txt val:Places_LT_val.txt test:Places_LT_test.txt
SPLITS_inat2018    := train:iNaturalist18_train.txt train:train2018.json test:iNaturalist18_val.txt test:val2018.json
SPLITS_generic     := train:train.txt val:val.txt test:test.txt
split_names = $(addprefix $(DATA_ROOT)/,$(patsubst $(1):%,%,$(filter $(1):%,\
              $(or $(SPLITS_$(DATASET)),$(SPLITS_generic)))))
# what a dataset's folder holds and a run never does (make clean keeps a folder holding one)
DATASET_FILES := classnames.txt cifar-100-python $(sort $(foreach s,$(SPLITS_imagenet_lt) $(SPLITS_places_lt) \
                 $(SPLITS_inat2018) $(SPLITS_generic),$(lastword $(subst :, ,$(s)))))
split_files = $(firstword $(wildcard $(call split_names,$(1))))
DATA_GOALS  := $(filter-out $(NO_RUN_GOALS) clean,$(or $(MAKECMDGOALS),all))
TRAIN_SPLIT := $(call split_files,train)
VAL_SPLIT   := $(call split_files,val)
EVAL_SPLIT  := $(or $(call split_files,$(or $(SPLIT),test)),$(call split_files,test))
# the split files whose images each output reads, named even before stage 00 has written them (each output's record
# is made after it)
TRAIN_IMAGES  := $(or $(TRAIN_SPLIT),$(firstword $(call split_names,train)),/dev/null)
EVAL_IMAGES   := $(or $(EVAL_SPLIT),$(firstword $(call split_names,$(or $(SPLIT),test))),/dev/null)
SYSTEM_IMAGES := $(TRAIN_IMAGES) $(EVAL_IMAGES) $(or $(VAL_SPLIT),$(firstword $(call split_names,val)),/dev/null)
STAMPS      := $(if $(DATA_GOALS),$(shell python3 datastamp.py $(DATA_ROOT) $(SYSTEM_IMAGES)))
TRAIN_STAMP := $(word 1,$(STAMPS))
EVAL_STAMP  := $(word 2,$(STAMPS))
VAL_STAMP   := $(word 3,$(STAMPS))
NAME_FILES  := $(wildcard $(addprefix $(DATA_ROOT)/,classnames.txt categories_places365.txt categories.json))
MODEL_FILES := $(wildcard $(MODEL) $(PRETRAINED))
TEXT_FILES  := $(wildcard $(DESCRIPTORS) $(CUPL) $(if $(WIKI),$(WIKI)/desc_*.txt))
# stage 00's .complete (toy world, CIFAR-100-LT) holds a digest of every file it wrote, and is rewritten only when one
# changed: a stage 00 run that changes nothing leaves the chain after it up to date
TRAIN_DATA  := $(TRAIN_SPLIT) $(NAME_FILES) $(MODEL_FILES) $(PREPARED)
EVAL_DATA   := $(TRAIN_SPLIT) $(EVAL_SPLIT) $(NAME_FILES) $(MODEL_FILES) $(PREPARED)
SYSTEM_DATA := $(sort $(TRAIN_DATA) $(EVAL_DATA) $(VAL_SPLIT))

# ---- each output's settings are recorded in $(RUN)/params/<name> when its stage succeeds; an output whose recorded
#      settings differ from this call's is made again. Nothing is written while make reads this file (`make -n` and
#      `make -q` write nothing), and a stage that fails records nothing, so after a typo in a path or flag is fixed, the
#      next make has nothing to redo. The record is the settings, not their spelling: paths as absolute paths, the
#      device as its kind (auto on this machine is cpu or cuda), and no speed knob (WORKERS, FEATURE_CACHE,
#      --grad-checkpointing), which changes no result ----
EPOCHS_ARG     := $(if $(EPOCHS),--epochs $(EPOCHS))
EVAL_CHOICES   := $(if $(SPLIT),--split $(SPLIT)) $(if $(SHOT_RULE),--shot-rule $(SHOT_RULE))
CORPUS_PARAMS  := --dataset $(DATASET) --data-root $(DATA_ROOT) --seed $(SEED) \
                  $(if $(WIKI),--wiki $(WIKI)) $(if $(DESCRIPTORS),--descriptors $(DESCRIPTORS)) \
                  $(if $(CUPL),--cupl $(CUPL)) $(if $(LLM_MODEL),--llm-model $(LLM_MODEL)) $(CORPUS_ARGS)
FEATURE_PARAMS := --model $(MODEL) --pretrained $(PRETRAINED) --device $(DEVICE) $(FEATURE_ARGS)
RUN_PARAMS     := --dataset $(DATASET) --data-root $(DATA_ROOT) --model $(MODEL) --pretrained $(PRETRAINED) \
                  --seed $(SEED) --device $(DEVICE) --workers $(WORKERS)
TRAIN_PARAMS   := $(RUN_PARAMS) --decode $(DECODE) --feature-cache $(FEATURE_CACHE) $(EPOCHS_ARG) $(TRAIN_ARGS)
EVAL_PARAMS    := $(RUN_PARAMS) --decode $(DECODE) --feature-cache $(FEATURE_CACHE) $(EVAL_CHOICES) $(EVAL_ARGS)
SYSTEM_PARAMS  := $(RUN_PARAMS) $(EPOCHS_ARG) $(EVAL_CHOICES) $(SYSTEM_ARGS)
# the recorded settings
path_key    = $(if $(or $(findstring /,$(1)),$(wildcard $(1))),$(abspath $(1)),$(1))
DEVICE_KIND := $(if $(filter auto,$(DEVICE)),$(if $(wildcard /dev/nvidia0),cuda,cpu),$(firstword $(subst :, ,$(DEVICE))))
SPEED_FLAGS := --grad-checkpointing
CORPUS_KEY  := --dataset $(DATASET) --data-root $(abspath $(DATA_ROOT)) --seed $(SEED) \
               $(if $(WIKI),--wiki $(abspath $(WIKI))) $(if $(DESCRIPTORS),--descriptors $(abspath $(DESCRIPTORS))) \
               $(if $(CUPL),--cupl $(abspath $(CUPL))) $(if $(LLM_MODEL),--llm-model $(LLM_MODEL)) $(CORPUS_ARGS)
FEATURE_KEY := --model $(call path_key,$(MODEL)) --pretrained $(call path_key,$(PRETRAINED)) --device $(DEVICE_KIND) \
               $(FEATURE_ARGS)
RUN_KEY     := --dataset $(DATASET) --data-root $(abspath $(DATA_ROOT)) --model $(call path_key,$(MODEL)) \
               --pretrained $(call path_key,$(PRETRAINED)) --seed $(SEED) --device $(DEVICE_KIND)
TRAIN_KEY   := $(RUN_KEY) --decode $(DECODE) $(EPOCHS_ARG) $(filter-out $(SPEED_FLAGS),$(TRAIN_ARGS))
EVAL_KEY    := $(RUN_KEY) --decode $(DECODE) $(EVAL_CHOICES) $(EVAL_ARGS)
SYSTEM_KEY  := $(RUN_KEY) $(EPOCHS_ARG) $(EVAL_CHOICES) $(filter-out $(SPEED_FLAGS),$(SYSTEM_ARGS))
RUN_FLAGS   := $(if $(RESUME),--resume) $(if $(FRESH),--fresh)

same = $(and $(findstring x$(1)x,x$(2)x),$(findstring x$(2)x,x$(1)x))
# $(1): the params file's name (one per output), $(2): the settings, $(3): the output they make, $(4): the stamps of
# the images it reads (one word per split file, datastamp.py)
params_rule = $(eval $(3): $(if $(call same,$(strip $(2) $(if $(4),images $(4))),$(strip $(if \
              $(wildcard $(RUN)/params/$(1)),$(file <$(RUN)/params/$(1))))),,FORCE))
# $(3): the split files whose images the output read, stamped again now (stage 00 may have rewritten them)
record = @{ mkdir -p $(RUN)/params && printf '%s%s\n' '$(subst ','\'',$(strip $(2)))' "$(if $(3), images \
         $$(python3 datastamp.py $(DATA_ROOT) $(3)))" > $(RUN)/params/$(1); } || \
         echo "could not record $(RUN)/params/$(1): make will run this stage again" >&2
$(call params_rule,corpus,$(CORPUS_KEY),$(RUN)/corpus.json)
$(call params_rule,features,$(FEATURE_KEY),$(RUN)/text_features.pt)
$(call params_rule,train,$(TRAIN_KEY),$(RUN)/coarse.pt,$(TRAIN_STAMP))
$(call params_rule,eval,$(EVAL_KEY),$(RUN)/results.json,$(EVAL_STAMP))
FORCE:

.PHONY: all corpus features train eval test test-all setup help clean clean-toy toy data table4 table6 \
        table7 tables bench bench-scale system compare table1 table2 table3 tune-toy toy-seeds toy-clip report FORCE

all: $(RUN)/results.json ## the whole chain: corpus -> text features -> training -> evaluation (+ report.html)
	@cat $(RUN)/results.md

corpus: $(RUN)/corpus.json ## stage 01: class names, text corpus, descriptors
features: $(RUN)/text_features.pt ## stage 02: cached CLIP text features
train: $(RUN)/coarse.pt ## stage 03: prompts, classifier, descriptor weights (RESUME=1 continues last.pt)
eval: $(RUN)/results.json ## stage 04: variants, K and tau sweeps, predictions, explanations, report.html
data: $(PREPARED) ## stage 00: build the toy world (DATASET=toy) or CIFAR-100-LT's files (DATASET=cifar100_lt)
toy: data

TOY_CLIP    ?= toy_clip/toy-clip.safetensors
DATA_PARAMS := $(if $(filter toy,$(DATASET)),--out $(DATA_ROOT) --seed $(SEED) --clip $(TOY_CLIP) $(TOY_ARGS),--root \
               $(CIFAR_ROOT) --ir $(IR))
# stage 00 runs again when its settings or the content of its code change (not their times: a checkout or an edit
# that changes nothing leaves the data, and the chain after it, as they are)
DATA_CODE   := $(if $(filter toy,$(DATASET)),00_make_toy.py toyworld.py $(TOY_CLIP),00_make_cifar100_lt.py) basics.py
DATA_KEY    := $(if $(filter toy,$(DATASET)),--out $(abspath $(DATA_ROOT)) --seed $(SEED) --clip $(abspath \
               $(TOY_CLIP)) $(TOY_ARGS),--root $(abspath $(CIFAR_ROOT)) --ir $(IR)) code $(if $(and $(PREPARED),\
               $(DATA_GOALS)),$(shell cksum $(DATA_CODE) 2>&1))
$(if $(PREPARED),$(call params_rule,data,$(DATA_KEY),$(PREPARED)))
$(DATA_ROOT)/.complete: | $(SETUP)
	$(PY) $(if $(filter toy,$(DATASET)),00_make_toy.py,00_make_cifar100_lt.py) $(DATA_PARAMS)
	$(call record,data,$(DATA_KEY))

TOY_CLIP_ARGS ?=
toy-clip: $(SETUP) ## pretrain the tiny CLIP again, compare with toy_clip/ (10 to 18 min on 2 cores; RESUME=1 continues)
	$(PY) 00_pretrain_toy_clip.py --out runs/toy-clip $(RUN_FLAGS) $(TOY_CLIP_ARGS)
	$(PY) 00_pretrain_toy_clip.py --compare runs/toy-clip/toy-clip.safetensors toy_clip/toy-clip.safetensors

$(RUN)/corpus.json: 01_build_corpus.py llm.py basics.py $(NAME_FILES) $(TEXT_FILES) $(PREPARED) $(SETUP)
	$(PY) 01_build_corpus.py $(CORPUS_PARAMS) --out $@
	$(call record,corpus,$(CORPUS_KEY))

$(RUN)/text_features.pt: 02_cache_descriptors.py common.py basics.py $(RUN)/corpus.json $(MODEL_FILES)
	$(PY) 02_cache_descriptors.py --corpus $(RUN)/corpus.json $(FEATURE_PARAMS) --out $@
	$(call record,features,$(FEATURE_KEY))

$(RUN)/coarse.pt: 03_train_coarse.py common.py basics.py $(RUN)/text_features.pt $(TRAIN_DATA)
	@$(PY) 04_eval_hlc.py --check-args --features $(RUN)/text_features.pt --coarse $@ $(EVAL_PARAMS) \
	    --out $(RUN)/results.json  # stage 04's settings checked before the training, not after it
	$(LAUNCH) 03_train_coarse.py --features $(RUN)/text_features.pt $(TRAIN_PARAMS) $(RUN_FLAGS) --out $@
	$(call record,train,$(TRAIN_KEY),$(TRAIN_IMAGES))

$(RUN)/results.json: 04_eval_hlc.py common.py basics.py $(RUN)/coarse.pt $(RUN)/text_features.pt $(EVAL_DATA)
	$(LAUNCH) 04_eval_hlc.py --features $(RUN)/text_features.pt --coarse $(RUN)/coarse.pt $(EVAL_PARAMS) --out $@
	$(call record,eval,$(EVAL_KEY),$(EVAL_IMAGES))

# ---- the paper's tables. Table 4: one training per ablation row, each in its own run directory
#      $(RUN)/ablation/<row>/ with the switches below (recorded in its meta); the full model is $(RUN) itself.
#      desc_ce: the full model with a plain cross-entropy descriptor loss (the kit's default is logit-adjusted);
#      na: Table 6's N/A row, a model of prompts and reweighted descriptors alone (the paper's Table 5 "Ours") ----
ABLATION_lp      := --prompt-tokens 0 --corpus-ratio 0 --mixup-alpha 0 --desc-loss-weight 0
ABLATION_vpt     := --corpus-ratio 0 --mixup-alpha 0 --desc-loss-weight 0
ABLATION_corpus  := --mixup-alpha 0 --desc-loss-weight 0
ABLATION_sfm     := --desc-loss-weight 0
ABLATION_desc_ce := --desc-loss-la 0
ABLATION_na      := --corpus-ratio 0 --mixup-alpha 0 --cls-loss-weight 0 --desc-loss-la 0
ABLATIONS := lp vpt corpus sfm desc_ce na
.SECONDARY: $(foreach a,$(ABLATIONS),$(RUN)/ablation/$(a)/coarse.pt $(RUN)/ablation/$(a)/results.json)
$(foreach a,$(ABLATIONS),$(call params_rule,ablation-$(a)-train,$(TRAIN_KEY) $(ABLATION_$(a)),\
  $(RUN)/ablation/$(a)/coarse.pt,$(TRAIN_STAMP)))
$(foreach a,$(ABLATIONS),$(call params_rule,ablation-$(a)-eval,$(EVAL_KEY),$(RUN)/ablation/$(a)/results.json,\
  $(EVAL_STAMP)))

$(RUN)/ablation/%/coarse.pt: 03_train_coarse.py common.py basics.py $(RUN)/text_features.pt $(TRAIN_DATA)
	$(LAUNCH) 03_train_coarse.py --features $(RUN)/text_features.pt $(TRAIN_PARAMS) $(ABLATION_$*) \
	    $(RUN_FLAGS) --out $@
	$(call record,ablation-$*-train,$(TRAIN_KEY) $(ABLATION_$*),$(TRAIN_IMAGES))

$(RUN)/ablation/%/results.json: 04_eval_hlc.py common.py basics.py $(RUN)/ablation/%/coarse.pt $(RUN)/text_features.pt $(EVAL_DATA)
	$(LAUNCH) 04_eval_hlc.py --features $(RUN)/text_features.pt --coarse $(RUN)/ablation/$*/coarse.pt $(EVAL_PARAMS) \
	    --explain 0 --no-report --out $@
	$(call record,ablation-$*-eval,$(EVAL_KEY),$(EVAL_IMAGES))

$(RUN)/tables/table4.md: make_tables.py $(RUN)/results.json $(foreach a,$(filter-out na,$(ABLATIONS)),\
  $(RUN)/ablation/$(a)/results.json)
	$(PY) make_tables.py --run $(RUN) --table 4 > /dev/null

$(RUN)/tables/table6.md: make_tables.py $(RUN)/results.json $(RUN)/ablation/na/results.json
	$(PY) make_tables.py --run $(RUN) --table 6 > /dev/null

$(RUN)/tables/table%.md: make_tables.py $(RUN)/results.json
	$(PY) make_tables.py --run $(RUN) --table $* > /dev/null

table4 table6 table7: table%: $(RUN)/tables/table%.md ## the paper's Table 4 (ablation), 6 (K, tau, N/A model), 7 (zero-shot)
	@cat $<
	@$(PY) report.py --run $(RUN) --quiet

tables: table4 table6 table7 ## Tables 4, 6 and 7 (table1-3 also run every compared system)

# ---- the compared systems (systems/<name>.py, docs/systems.md), each in $(RUN)/systems/<name>/ with its own params
#      file. Each runs its own recipe for the dataset (a dict at the top of its script); EPOCHS=N sets every phase to N
#      epochs, SYSTEM_ARGS passes any other flag. One process each: GPUS is for stages 03-04 ----
SYSTEMS := $(sort $(filter-out __init__ frame,$(patsubst systems/%.py,%,$(wildcard systems/*.py))))
NAME ?=
$(foreach s,$(SYSTEMS),$(call params_rule,system-$(s),$(SYSTEM_KEY),$(RUN)/systems/$(s)/results.json,\
  $(TRAIN_STAMP) $(EVAL_STAMP) $(VAL_STAMP)))
.SECONDARY: $(foreach s,$(SYSTEMS),$(RUN)/systems/$(s)/results.json)
ifneq ($(filter system,$(MAKECMDGOALS)),)
ifeq ($(filter $(NAME),$(SYSTEMS)),)
SYSTEM_GUESS := $(shell python3 -c 'import difflib, sys; name = sys.argv[1].lower().replace("-", "_"); \
  print(*difflib.get_close_matches(name, sys.argv[2:], 1, 0.5))' '$(NAME)' $(SYSTEMS) 2>/dev/null)
$(error $(if $(NAME),NAME=$(NAME) is not a compared system$(if $(SYSTEM_GUESS), (did you mean NAME=$(SYSTEM_GUESS)?)),make \
  system needs NAME); choose one of: $(SYSTEMS))
endif
endif

$(RUN)/systems/%/results.json: systems/%.py systems/frame.py common.py basics.py $(RUN)/text_features.pt $(SYSTEM_DATA)
	$(PY) -m systems.$* --features $(RUN)/text_features.pt $(SYSTEM_PARAMS) $(RUN_FLAGS) --out $(@D)
	$(call record,system-$*,$(SYSTEM_KEY),$(SYSTEM_IMAGES))

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

REPORT_NEEDS := $(if $(wildcard $(RUN)/results.json),,$(RUN)/results.json)  # made only when missing
report: $(REPORT_NEEDS) ## rewrite $(RUN)/report.html from whatever results the run holds, rerunning nothing
	$(PY) report.py --run $(RUN)

# ---- the toy comparison's learning rates, picked on the val split from one shared grid (docs/systems.md) ----
tune-toy: $(RUN)/text_features.pt ## every method at its original lr x 0.3 to 3000 on the toy's val split
	$(PY) tune_toy.py --run $(RUN) --features $(RUN)/text_features.pt $(RUN_PARAMS) $(TUNE_ARGS)

# seed s of RUN=x (DATA_ROOT=y) goes to x-seed<s> (y-seed<s>), as runs/toy and runs/toy-seed1 by default: every seed
# its own world and run, never one folder for all
seed_folder = $(if $(filter-out 0,$(2)),$(1)-seed$(2),$(1))
SEED_RUN   := $(if $(RUN_GIVEN),$(RUN),runs/toy)
SEED_DATA  := $(if $(DATA_ROOT_GIVEN),$(DATA_ROOT),data/toy)
SEED_RUNS  := $(foreach s,0 1 2,$(call seed_folder,$(SEED_RUN),$(s)))
seed_args   = RUN=$(call seed_folder,$(SEED_RUN),$(1)) DATA_ROOT=$(call seed_folder,$(SEED_DATA),$(1))
toy-seeds: ## make tables and make compare for SEED=0, 1, 2, then their mean, spread and relations (runs/toy-seeds.md)
	$(foreach s,0 1 2,$(MAKE) tables compare DATASET=toy SEED=$(s) PY=$(PY) $(call seed_args,$(s)) &&) true
	$(PY) make_tables.py --seeds $(SEED_RUNS) --out $(dir $(firstword $(SEED_RUNS)))toy-seeds.md

$(VENV)/.installed: requirements.txt constraints.txt
	@$(VENV_PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null || { \
	    found=$$(command -v $(VENV_PYTHON) >/dev/null && $(VENV_PYTHON) --version 2>&1 || echo not found); \
	    echo "the kit needs Python 3.11 or newer (its pinned numpy and torch): $(VENV_PYTHON) is $$found. Name another" \
	         "with VENV_PYTHON=python3.11, or run in your own environment with PY=python (README, Quick start)" >&2; exit 1; }
	$(VENV_PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install -q -r requirements.txt
	touch $@

BENCH_ARGS ?=
bench: $(SETUP) ## speed figures: train/eval/text throughput, TFLOP/s, MFU, JPEG end-to-end, GPU memory
	$(PY) bench.py --device $(DEVICE) $(BENCH_ARGS)

bench-scale: $(SETUP) ## stages 01-04 on a synthetic world of iNaturalist's size: time and peak memory per stage
	$(PY) bench.py --scale $(BENCH_ARGS)

setup: $(SETUP) ## create the virtual environment (make all and make test do this themselves)

test: $(SETUP) ## the tests that cover every path once (minutes: the README's Tests)
	$(PY) -m pytest -q -m "not slow" --durations=15 tests

test-all: $(SETUP) ## every test, the toy world end to end and the slow checks too (what CI runs)
	$(PY) -m pytest -q --durations=15 tests

# the kit removes only what it made: a run directory holding its params/ (or nothing yet), toy worlds holding its marker
clean: ## remove this run directory
	@if [ -d $(RUN) ] && [ ! -d $(RUN)/params ] && \
	    [ -n "$$(ls -A $(RUN) | grep -v -e '^\.make\.lock$$' -e '^llm_cache\.jsonl$$')" ]; then \
	    echo "RUN=$(RUN) holds files but no params/ (no stage of the kit finished there): not removed" >&2; exit 1; fi
	@found=$$(find $(RUN) -maxdepth 3 \( -false $(foreach f,$(DATASET_FILES),-o -name $(f)) \) -print -quit 2>/dev/null); \
	if [ -n "$$found" ]; then echo "RUN=$(RUN) holds a dataset ($$found), which no run writes: not removed" >&2; \
	    exit 1; fi
	@if [ -s $(RUN)/llm_cache.jsonl ]; then \
	    find $(RUN) -mindepth 1 -maxdepth 1 ! -name llm_cache.jsonl -exec rm -rf {} +; \
	    echo "removed $(RUN) but its llm_cache.jsonl ($$(wc -l < $(RUN)/llm_cache.jsonl) answers): asking again" \
	         "costs money and, at temperature 0.7, gives other descriptors; remove it yourself to ask anew"; \
	else echo "rm -rf $(RUN)"; rm -rf $(RUN); fi

clean-toy: ## remove every toy world the kit made (data/toy*) and their runs
	@for d in data/toy data/toy-seed*; do [ -e $$d/.made-by-hlc-kit ] || [ -e $$d/clip/toy-clip.json ] || continue; \
	    echo "rm -rf $$d"; rm -rf $$d; done
	rm -rf runs/toy runs/toy-seed* runs/toy-seeds.md

help: ## this list
	@grep -E '^[a-z0-9 -]+:.*## ' $(MAKEFILE_LIST) | sed -E 's/:.*## /\t/' | expand -t 12
	@echo; echo "Variables: DATASET=$(DATASET) DATA_ROOT=$(DATA_ROOT) RUN=$(RUN) MODEL=$(MODEL) PRETRAINED=$(PRETRAINED)"
	@echo "           SEED=$(SEED) EPOCHS=$(EPOCHS) (empty: each script's recipe) DEVICE=$(DEVICE) WORKERS=$(WORKERS)"
	@echo "           DESCRIPTORS=$(DESCRIPTORS) WIKI=$(WIKI) CUPL=$(CUPL) PY=$(PY)"
	@echo "           RESUME=$(RESUME) (1: continue an interrupted training) FRESH=$(FRESH) (1: start it over)"
	@echo "           SPLIT=$(SPLIT) SHOT_RULE=$(SHOT_RULE) (evaluation split and shot rule of every stage and system)"
	@echo "           DECODE=$(DECODE) (pil, tensor or device)"
	@echo "           FEATURE_CACHE=$(FEATURE_CACHE) (frozen-tower features kept between runs)"
	@echo "           GPUS=$(GPUS) (torchrun processes for stages 03-04) TORCHRUN_ARGS=$(TORCHRUN_ARGS)"
	@echo "           LLM_MODEL=$(LLM_MODEL) (a chat model for the descriptors; key in OPENAI_API_KEY, endpoint in OPENAI_BASE_URL)"
	@echo "           NAME=$(NAME) (make system: one of $(SYSTEMS)) IR=$(IR) (cifar100_lt: 100, 50 or 10)"
	@echo "           CORPUS_ARGS, FEATURE_ARGS, TRAIN_ARGS, EVAL_ARGS, SYSTEM_ARGS, BENCH_ARGS, TUNE_ARGS: any other flag"
