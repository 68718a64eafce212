# Sourced by the shell scripts under docs/ and studies/ (from the repository root). With SMOKE=1
# (tests/test_scripts.py) they run the same commands for a few steps of a one-block model on
# tiny data, in seconds, so that none of them can rot unnoticed; without it, TINY is empty.
# CIFAR10 points the scripts that read CIFAR-10 at a folder of .npz files in its layout.
CIFAR10=${CIFAR10:-../shared/data/cifar10}
TINY=""
if [[ ${SMOKE:-0} == 1 ]]; then
  TINY="model.depth=1 model.out_dim=64 model.head_hidden_dim=64 model.head_bottleneck_dim=32
    train.batch_size_per_worker=8 train.steps_per_epoch=2 train.epochs=2 train.precision=fp32
    train.knn_every_epochs=1 train.knn_train_samples=40 train.knn_test_samples=20
    optim.warmup_epochs=0 loss.warmup_teacher_temp_epochs=1 data.num_workers=0
    data.shuffle_buffer=16"
fi
