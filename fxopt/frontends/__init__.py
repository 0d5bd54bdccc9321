"""Entry points that call the fxopt API from elsewhere: the ``torch.compile`` backend
(:mod:`fxopt.frontends.dynamo`). They sit above the API; the API never imports them."""
