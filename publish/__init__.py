"""Publishing: the model to OpenXLab / Hugging Face / any git remote, and the chat app as a Space.

    python -m publish model MODEL_DIR --to openxlab:USER/REPO
    python -m publish app --to hf:USER/SPACE --model-repo https://code.openxlab.org.cn/USER/REPO.git

targets.py (parse TARGET), credentials.py (tokens: env / git credential helper, askpass, masking),
validate.py (is the model dir complete), card.py (model card), bundle.py (files to publish),
gitops.py (git + git-lfs route), hub.py (huggingface_hub route), deliver.py (pick the route),
model.py and app_bundle.py (the two commands).
"""
