"""
The paper's strategies as data: one row each, read by regress.py (which encoder, frozen or
fine-tuned, the default lr and batch size), evaluate.py (Table 6's names, Fig. 3's axis), run_all.sh
and the tests. Table 3 gives the encoders, Table 6 the learning rate and batch size of each result,
Table 4 the batch sizes explored. Adding a strategy is one row; `python strategies.py` prints what
run_all.sh runs:

    python strategies.py          # strategy modality encoder, one line each
"""
import math
import os
from dataclasses import dataclass

VIT = 'google/vit-base-patch32-224-in21k'
DISTILBERT = 'distilbert-base-uncased'
CLIP = 'openai/clip-vit-base-patch32'
# the folder contrastive.py writes (regress.py --fclip, default results/fclip/model)
FCLIP = 'fclip'
MODALITIES = ('vision', 'text')


@dataclass(frozen=True)
class Strategy:
    name: str            # Table 6's name
    # encoder of the frames: a hub name or folder, or FCLIP (Table 3); None: no vision run
    vision: str | None
    text: str | None     # encoder of the captions; None: no text run
    # True: the head alone learns, on embeddings computed once (eq. 10); False: eq. 8
    frozen: bool
    # modality -> learning rate of the paper's result (Table 6), for each modality run
    lr: dict
    batch_size: dict     # modality -> batch size of the paper's result (Table 6)
    figure: str = ''     # the paper's Fig. 3 name where it differs (SFT: supervised fine-tuning)

    def encoder(self, modality):
        return self.vision if modality == 'vision' else self.text

    def checkpoint(self, modality, fclip):
        """the encoder to load: a hub name or folder, or for FCLIP the folder fclip
        (contrastive.py's)"""
        return fclip if self.encoder(modality) == FCLIP else self.encoder(modality)

    def encoder_label(self, modality, kind, given=None):
        """Table 6's encoder name, from what was loaded (kind: models.describe's): 'ViT', 'CLIP -
        Vision', 'FCLIP - Text'; a checkpoint given in place of the row's adds its folder's name
        ('BERT (all-MiniLM-L6-v2)') unless it only repeats the encoder's ('vit' for ViT)"""
        name = os.path.basename(given.rstrip('/')) if given else ''
        named = f" ({name})" if given and name.lower() != kind.lower() else ''
        if kind == 'CLIP':
            fclip = self.encoder(modality) == FCLIP and not given
            kind = f"{'FCLIP' if fclip else 'CLIP'} - {modality.title()}"
        return kind + named

    def batch_sizes(self, modality, given=None):
        """the batch sizes to try: Table 6's (given None), the ones given, or ['table4']: Table 4's
        range"""
        if given is None:
            return [self.batch_size[modality]]
        if given != ['table4']:
            return given  # (numbers mixed with 'table4' are refused by runs.check_regress)
        lo, hi = TABLE4[modality, self.frozen]
        return [2 ** i for i in range(int(math.log2(lo)), int(math.log2(hi)) + 1)]


STRATEGIES = {
    1: Strategy('Unimodal', VIT, DISTILBERT, True,
                dict(vision=2e-3, text=1e-3), dict(vision=1024, text=512)),
    2: Strategy('Adapted Unimodal', VIT, DISTILBERT, False,
                dict(vision=3e-5, text=1e-5), dict(vision=128, text=256), figure='Unimodal-SFT'),
    3: Strategy('CLIP-Based', CLIP, CLIP, True,
                dict(vision=1e-3, text=1e-3), dict(vision=1024, text=4096)),
    4: Strategy('Adapted CLIP-Based', CLIP, CLIP, False,
                dict(vision=2e-6, text=2e-6), dict(vision=128, text=256), figure='CLIP-SFT'),
    5: Strategy('FCLIP-Based', FCLIP, FCLIP, True,
                dict(vision=1e-3, text=2e-3), dict(vision=2048, text=512)),
    6: Strategy('Adapted FCLIP-Based', FCLIP, FCLIP, False,
                dict(vision=2e-6, text=3e-6), dict(vision=128, text=512), figure='FCLIP-SFT'),
}

# Table 4: the batch sizes explored (powers of two from, to), by modality and whether the encoder is
# frozen
TABLE4 = {('vision', True): (256, 2048), ('vision', False): (64, 512), ('text', True): (512, 4096),
          ('text', False): (64, 512)}


def label(number):
    """Table 6's strategy cell: '3 - CLIP-Based'"""
    return f"{number} - {STRATEGIES[number].name}"


if __name__ == '__main__':
    for number, row in STRATEGIES.items():
        for modality in MODALITIES:
            if row.encoder(modality):
                print(number, modality, row.encoder(modality))
