"""Paper Table 1 on CIFAR-10: ResNet-18 (CIFAR stem), NCE with m = 4096, 200 epochs.

The Table-1 rows are one override away:
  --config.objective=softmax                      (full non-parametric softmax, 80.8% in the paper)
  --config.objective=parametric_softmax           (parametric instance softmax)
  --config.objective=infonce                      (sampled softmax-CE with bank negatives)
  --config.num_negatives=1|10|512|4096            (NCE m; 4096 is the paper's 80.4%)
  --config.proximal_weight=30                     (paper Eq. 9's lambda)
"""

from instdisc_jax import default_config


def get_config():
  config = default_config.get_config()     # the reference's CIFAR-10 setting
  config.dataset = "cifar10"
  config.model = "cifar_resnet18"
  config.image_size = 32
  config.temperature = 0.07
  config.knn_temperature = 0.07
  return config
