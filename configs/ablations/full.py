# Table 3, VDOT (6): DMD + OTD + GAN from AccWanInit, the recipe as it is.
_base_ = ['./_tiny_ablation.py']
ablation_label = '(6) VDOT: DMD + OTD + GAN, AccWanInit'
