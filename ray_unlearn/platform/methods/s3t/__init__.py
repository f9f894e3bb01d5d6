"""S3T: sliced LoRA training on a frozen backbone; deletion deactivates stages."""

from __future__ import annotations

from ray_unlearn.platform.methods.registry import Method, Section, register
from ray_unlearn.platform.methods.s3t import hooks
from ray_unlearn.platform.methods.s3t.config import S3TConfig

METHOD = register(
    Method(
        "s3t",
        description="sliced LoRA training on a frozen backbone",
        kinds=(hooks.KIND,),
        kind_label=("S3T", "whose deletions are deactivations"),
        kind_exact=True,
        kind_description="exact, a run kind: sliced LoRA training on a frozen backbone; "
        "deletions deactivate the stages that saw the data",
        sections=(
            Section(
                "s3t",
                S3TConfig,
                "S3T settings; used when unlearning.strategy is s3t (defaults if omitted).",
                optional=True,
            ),
        ),
        train=hooks.train,
        runtime=hooks.runtime,
        undeletable=hooks.undeletable,
        restore_plan=hooks.restore_plan,
        chain_exact=hooks.chain_exact,
        check_model=hooks.check_model,
        serving_model=hooks.serving_model,
        background_restore=hooks.background_restore,
        sweep_problems=hooks.sweep_problems,
        ray_train_job="ray_unlearn.train.s3t_job",
    )
)
