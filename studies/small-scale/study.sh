#!/usr/bin/env bash
# The recipe study behind studies/small-scale/README.md: short pretrain-local runs on CIFAR-10 at 32 px,
# each a complete run (its own warm-up and cosine decay), with the teacher's online k-NN
# (k = 20, 5,000-image bank, 2,000 test images) at step 0 and after every 80-step "epoch".
# Usage: bash studies/small-scale/study.sh [TRIAL ...]   (no argument: every trial below)
# A finished trial (its teacher_backbone.safetensors exists) is skipped and an interrupted one
# resumes from its latest checkpoint (its train_s clock continues from the checkpoint's).
set -euo pipefail
# The whole script is one block, read before it runs: editing this file (adding a trial) while
# a study runs then cannot change what the running study executes.
{
cd "$(dirname "$0")/../.."
source studies/smoke.sh  # SMOKE=1: tiny data, a few steps (tests/test_scripts.py)
OUT=${STUDY_DIR:-runs/study}
DATA=${STUDY_DATA:-data/cifar10}
mkdir -p "$OUT"
python run_pipeline.py prepare-data --source cifar10 --from "$CIFAR10" --out "$DATA"

COMMON="data.path=$DATA train.output_dir=$OUT train.steps_per_epoch=80 train.epochs=3
  train.knn_every_epochs=1 train.knn_train_samples=5000 train.knn_test_samples=2000
  train.log_every_steps=20 optim.warmup_epochs=0.5 loss.warmup_teacher_temp_epochs=1
  optim.freeze_last_layer=0 data.num_workers=1"

# Trial M's recipe (the tiny-cpu preset of today), the base of the trials after it: each adds
# its own keys, and a key given again overrides M's value (the last one wins).
M_RECIPE="optim.lr=2e-3 model.drop_path=0 model.out_dim=256
    model.depth=4 data.local_crops_number=2 train.steps_per_epoch=200 train.epochs=6
    loss.warmup_teacher_temp=0.02 loss.teacher_temp=0.02
    loss.warmup_teacher_patch_temp=0.02 loss.teacher_patch_temp=0.02 optim.warmup_epochs=0.5"

# Each trial changes a few keys of study-base.yaml, the tiny-cpu preset from before the study
# (trial M is the tiny-cpu preset of today; see studies/small-scale/README.md for why).
declare -A TRIALS=(
  [A-tinycpu]=""
  [B-ibot-lr1.5e-3]="optim.lr=6e-3 model.drop_path=0 model.out_dim=1024"
  [F-sharp0.02-K256]="optim.lr=6e-3 model.drop_path=0 model.out_dim=256
    loss.warmup_teacher_temp=0.02 loss.teacher_temp=0.02
    loss.warmup_teacher_patch_temp=0.02 loss.teacher_patch_temp=0.02"
  # longer and cheaper per step: 4 blocks, 2 local crops, 1,200 steps (200-step "epochs")
  [H-depth4-2loc-1200steps]="optim.lr=6e-3 model.drop_path=0 model.out_dim=1024 model.depth=4
    data.local_crops_number=2 train.steps_per_epoch=200 train.epochs=6
    loss.warmup_teacher_temp_epochs=3 optim.warmup_epochs=0.5"
  # H's cheaper, longer run with F's sharp teacher (H's targets went uniform)
  [I-depth4-2loc-sharp0.02-K256-1200steps]="optim.lr=6e-3 model.drop_path=0 model.out_dim=256
    model.depth=4 data.local_crops_number=2 train.steps_per_epoch=200 train.epochs=6
    loss.warmup_teacher_temp=0.02 loss.teacher_temp=0.02
    loss.warmup_teacher_patch_temp=0.02 loss.teacher_patch_temp=0.02 optim.warmup_epochs=0.5"

  # I plus batch norm in the head (DINO/iBOT --use_bn_in_head), against the collapse
  [J-I-headbn]="optim.lr=6e-3 model.drop_path=0 model.out_dim=256 model.head_bn=true
    model.depth=4 data.local_crops_number=2 train.steps_per_epoch=200 train.epochs=6
    loss.warmup_teacher_temp=0.02 loss.teacher_temp=0.02
    loss.warmup_teacher_patch_temp=0.02 loss.teacher_patch_temp=0.02 optim.warmup_epochs=0.5"

  # J with gentler crops: views of one image that share more content agree more
  [K-J-gentle-crops]="optim.lr=6e-3 model.drop_path=0 model.out_dim=256 model.head_bn=true
    model.depth=4 data.local_crops_number=2 train.steps_per_epoch=200 train.epochs=6
    loss.warmup_teacher_temp=0.02 loss.teacher_temp=0.02
    loss.warmup_teacher_patch_temp=0.02 loss.teacher_patch_temp=0.02 optim.warmup_epochs=0.5
    data.global_crops_scale=[0.5,1.0] data.local_crops_scale=[0.25,0.5]"


  # I at the default peak LR (5e-4 at batch 64): B reached uniform targets soonest at 1.5e-3
  [M-I-lr5e-4]="$M_RECIPE"

  # M with a teacher that keeps following the student late in a short run
  [N-M-momentum0.98]="$M_RECIPE optim.momentum_teacher=0.98"

  # M with a constant LR after the warm-up (min_lr = the peak at batch 64) and a teacher that
  # follows faster (0.95): N showed the late stall is not only the EMA
  [P-M-constlr-m0.95]="$M_RECIPE optim.min_lr=5e-4 optim.momentum_teacher=0.95"

  # M at half its peak LR (2.5e-4 at batch 64): lowering it from 1.5e-3 to 5e-4 made M rise
  [Q-M-lr2.5e-4]="$M_RECIPE optim.lr=1e-3"
  # M without the patch loss (DINO's [CLS] term only): does the MIM term slow the [CLS]
  # features at this scale? (and no teacher head over all 64 patches: a cheaper step)
  [R-M-dino]="$M_RECIPE loss.framework=dino"

  # M with a 400-step warm-up instead of 100: M rose while its LR was near the peak
  [S-M-warmup400]="$M_RECIPE optim.warmup_epochs=2"

  # M at batch 128 (same images seen, half the steps, LR scaled linearly): centring and the
  # teacher's targets are estimated over twice the images per step
  [T-M-batch128]="$M_RECIPE train.steps_per_epoch=100 train.batch_size_per_worker=128"
  # M with a hierarchical-MLP patch stem (Touvron et al., "Three things everyone should know
  # about vision transformers", ECCV 2022): a per-patch 2-layer MLP instead of one linear map;
  # it keeps patches independent, so masking still hides a patch completely
  [U-M-hmlp]="$M_RECIPE model.stem=hmlp"
  # M with 64 prototypes instead of 256: fewer, coarser clusters than a batch of 64 can fill
  # (each prototype then gets about one image per batch instead of a quarter)
  [V-M-K64]="$M_RECIPE model.out_dim=64"
  # M with Sinkhorn-Knopp targets instead of the EMA centre (SwAV; DINOv2's teacher): each
  # batch's targets spread over the prototypes from the first step, whatever the features
  [W-M-sinkhorn]="$M_RECIPE loss.centering=sinkhorn"
  # M without colour jitter and grayscale (crop, flip, blur, solarisation only): at init two
  # views of one image land on the same teacher prototype 54 % of the time without the colour
  # distortion and 21 % with it (studies/small-scale/view_agreement.py), so the targets say little
  # about the image until colour invariance is learned
  [X-M-nocolour]="$M_RECIPE data.color_jitter_prob=0 data.grayscale_prob=0"
  # between M and X: half DINO's jitter strengths and half its grayscale probability
  [Y-M-halfcolour]="$M_RECIPE data.color_jitter=[0.2,0.2,0.1,0.05] data.grayscale_prob=0.1"
  # M with 6 local crops instead of 2 (DINO's multi-crop: 3x the [CLS] pairs per image, about
  # 1.5x the step)
  [Z-M-6local]="optim.lr=2e-3 model.drop_path=0 model.out_dim=256
    model.depth=4 data.local_crops_number=6 train.steps_per_epoch=200 train.epochs=6
    loss.warmup_teacher_temp=0.02 loss.teacher_temp=0.02
    loss.warmup_teacher_patch_temp=0.02 loss.teacher_patch_temp=0.02 optim.warmup_epochs=0.5"
  # M with a one-layer head (a linear map to the bottleneck, then the prototypes) instead of
  # DINO's 3-layer MLP: the supervised reference learns fast through a linear head on [CLS]; with
  # less head between them the prototypes' clustering acts on the backbone's [CLS] more directly
  [AA-M-head1]="$M_RECIPE model.head_layers=1"
  # M with a softer student (temperature 0.2 instead of DINO's 0.1): the cross-entropy
  # saturates later, so a student far from the sharp (0.02) targets keeps a graded signal
  [AB-M-student0.2]="$M_RECIPE loss.student_temp=0.2"
  # M with 2 blocks instead of 4: about 1.6x the steps per CPU-minute; L showed the recipe
  # gains with steps, so a cheaper step that learns as much per step gains per minute
  [AC-M-depth2]="$M_RECIPE model.depth=2"
  # M without masking (masking.prob=0: the student's [CLS] sees the full global crops, so the
  # patch term has nothing to predict): DINO with multi-crop. Does hiding patches slow the
  # [CLS] features at this scale?
  [AD-M-nomask]="$M_RECIPE masking.prob=0"
  # M for 12,000 steps (about 4 hours, 15 CIFAR-10 epochs; resumable, so it spans sessions):
  # where the shipped recipe's slow rise ends, i.e. what budget a strategy comparison needs
  [LL-M-12000steps]="$M_RECIPE train.steps_per_epoch=400 train.epochs=30
    optim.warmup_epochs=0.25"
  # M (the tiny-cpu preset) for 4,000 steps instead of 1,200 (its warm-up the same 100 steps,
  # its cosine over the whole run): how many CPU-minutes the shipped recipe needs for +10
  [L-M-4000steps]="$M_RECIPE train.steps_per_epoch=400 train.epochs=10
    optim.warmup_epochs=0.25"
  # LL at twice its peak LR (1e-3 at batch 64; the same 12,000-step schedule and seed, so its
  # k-NN pairs with LL's point for point): LL gained about 1 point per 10 CPU-minutes while its
  # LR was near the peak, a third of the 30-minute target's rate; does a higher peak, held as
  # long, learn faster, or drive the targets uniform as I's 1.5e-3 did over 1,200 steps?
  [AE-LL-lr1e-3]="$M_RECIPE optim.lr=4e-3 train.steps_per_epoch=400 train.epochs=30
    optim.warmup_epochs=0.25"
  # A complete 5,200-step run that keeps LL's LR high: cosine from the peak (5e-4 at batch 64)
  # down to half of it (LL's LR at step 5,200 was 61 % of the peak). If it matches LL's +10 at
  # step 5,200, it is the schedule for a strategy comparison at a budget where features learn
  [AF-M-5200steps-floor]="$M_RECIPE train.steps_per_epoch=400 train.epochs=13
    optim.warmup_epochs=0.25 optim.min_lr=2.5e-4"
  # LL with 8-pixel patches (a 4 x 4 grid on the 32 px global crops, 2 x 2 on the 16 px local
  # ones): 17 tokens instead of 65 per global crop, so several times the steps per CPU-minute.
  # Every lever tried on the 8 x 8 grid moved the k-NN per step by about a point; this one
  # buys steps. Same schedule and seed as LL, so its curve pairs with LL's step for step and
  # the plot's time axis shows what the cheaper step is worth per minute.
  [AG-LL-patch8]="$M_RECIPE model.patch_size=8 train.steps_per_epoch=400 train.epochs=30
    optim.warmup_epochs=0.25"
  # AG with its colour augmentation applied per batch (data.colour_on=batch): at 8-pixel
  # patches the one loader worker's per-crop torchvision calls, not the model, bounded AG's
  # speed (model step 3.2x the 8 x 8 recipe's, end to end 2.3x). Same distributions, same seed
  # and schedule; its curve pairs with AG's step for step (the colour draws differ)
  [AH-AG-colourbatch]="$M_RECIPE model.patch_size=8 data.colour_on=batch
    train.steps_per_epoch=400 train.epochs=30 optim.warmup_epochs=0.25"
  # AH with random masking instead of AttMask-High: the 30-minute target asks for both
  # strategies. Same seed, so the same initial weights and sample order as AH: its curve pairs
  # with AH's step for step (the masks differ, so the colour and crop draws after the first
  # batch may too)
  [AI-AH-random]="$M_RECIPE model.patch_size=8 data.colour_on=batch masking.strategy=random
    train.steps_per_epoch=400 train.epochs=30 optim.warmup_epochs=0.25"
)
ORDER=(A-tinycpu B-ibot-lr1.5e-3 F-sharp0.02-K256 H-depth4-2loc-1200steps
       I-depth4-2loc-sharp0.02-K256-1200steps J-I-headbn K-J-gentle-crops M-I-lr5e-4
       N-M-momentum0.98 P-M-constlr-m0.95
       Q-M-lr2.5e-4 R-M-dino S-M-warmup400 T-M-batch128 U-M-hmlp V-M-K64
       W-M-sinkhorn X-M-nocolour Y-M-halfcolour L-M-4000steps
       Z-M-6local AA-M-head1 AB-M-student0.2
       AC-M-depth2 AD-M-nomask LL-M-12000steps AE-LL-lr1e-3
       AF-M-5200steps-floor AG-LL-patch8 AH-AG-colourbatch AI-AH-random)
for name in "${@:-${ORDER[@]}}"; do
  if [[ -f "$OUT/$name/teacher_backbone.safetensors" ]]; then echo "$name: done"; continue; fi
  echo "$name: ${TRIALS[$name]}"
  # shellcheck disable=SC2086
  python run_pipeline.py pretrain-local --config studies/small-scale/study-base.yaml $COMMON train.run_name=$name \
    ${TRIALS[$name]} $TINY >> "$OUT/$name.log" 2>&1 || { echo "$name failed"; tail -3 "$OUT/$name.log"; failed=1; }
done
exit "${failed:-0}"  # a failed trial does not stop the others, but the study reports it
}
